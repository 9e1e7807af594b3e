"""Content verdicts: malware (ClamAV's clamd) and spam (rspamd), after the 250, in the extraction step."""
