"""The local mode: the cluster's build and repository on one machine, served by a real Triton, with no cluster."""
