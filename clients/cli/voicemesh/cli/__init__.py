"""The `voicemesh` command line: `up` (the local supervisor, `mesh`), `talk`, `chat`, `serve`, `models`, `bench`."""
