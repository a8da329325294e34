"""Cloud providers: each against a fake of its wire protocol (fakes/), and the swap test."""
