"""The data plane's configuration contract: frozen dataclasses (see ``model``)."""
