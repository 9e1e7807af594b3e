"""
The web console (C{/console/} on the API's site): server-rendered pages over
the store for the people who answer "did our customer's order arrive?".
"""
