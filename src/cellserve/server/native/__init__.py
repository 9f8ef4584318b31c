"""The native front ends (the data plane): the wire in C++, Python keeps control."""
