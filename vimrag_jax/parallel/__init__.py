"""Device mesh, sharding rules and the pjit / pmap training steps around one pure update."""
