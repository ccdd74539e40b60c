"""meshproxy: a service-mesh sidecar proxy that speaks Istio's configuration."""

__version__ = "0.1.0"
