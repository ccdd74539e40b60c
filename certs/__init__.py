"""certs: the mesh certificate authority (root CA, SPIFFE workload certificates)."""
