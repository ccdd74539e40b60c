"""control: the meshproxy control plane; ``control.istio`` holds the typed Istio resources and
the pure translation into :class:`meshproxy.config.model.Snapshot` shared with standalone mode."""
