"""deltavault delta store: a content-addressed chunk store with manifests and refs."""
