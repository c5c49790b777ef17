"""Turning Slips incidents and generic chat data into ChatML training records."""
