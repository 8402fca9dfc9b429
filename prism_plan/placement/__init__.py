"""The domain: model and cluster specs, plans and their metrics."""
