"""
The benchmark harness of mailingest: C{python -m bench} or C{bench/run}.

It lives outside the package (and outside the trial suite) because it
measures speed, which no unit test should assert. See bench/README.md.
"""
