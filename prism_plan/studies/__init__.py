"""Studies built on the library: every solver against the baselines on unseen requests (comparison), migration
strategies on a drifting workload (drift), the quickstart, and the bundled data they run on."""
