"""Lightning adapters: they receive built objects and never read a config."""
