"""Kubernetes integration: what meshproxy needs to run as a sidecar in a cluster.

Theory of operation
-------------------
Each module of this package is one piece of issue 6 ("The sidecar in Kubernetes"):

- :mod:`meshproxy.k8s.inject` is a pure function from a parsed workload object (Deployment,
  StatefulSet, DaemonSet, Job, CronJob, Pod) to the same object with the sidecar, its
  ``meshproxy capture`` init container and Istio-style labels/annotations added; it does no
  I/O, so ``meshproxy inject`` (files) and ``meshproxy webhook`` (admission) share it.
- The other modules (the Kubernetes config source of ``meshproxy control --kubernetes`` and the
  edges of the commands) are added beside it; they import downward only (edges -> cores).
"""
