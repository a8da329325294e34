"""Fake cloud providers speaking their real wire protocols on 127.0.0.1 (base.py says how)."""
