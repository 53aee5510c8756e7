"""`weir`: the command line for a running node, over the services' own gRPC sockets."""
