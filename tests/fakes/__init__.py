"""In-test stand-ins for peers that cannot run on the test machines.

Each one is a FAKE built from a public API definition: it shows that credless speaks the
wire protocol as written, not that it interoperates with the real implementation.
"""
