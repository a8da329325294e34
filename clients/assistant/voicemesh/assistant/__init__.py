"""The daily-life assistant: a Converse client whose tools run on the user's side."""
