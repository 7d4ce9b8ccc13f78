"""A real-traffic lab: network namespaces as "pods", real servers, real clients, real tcpdump captures.

Everything here runs real kernels' TCP stacks; nothing in the data path is simulated except the optional
user-space impaired link (tunlink), which only loses, duplicates, reorders and delays real packets.
"""
