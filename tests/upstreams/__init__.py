"""Real HTTP/1.1 servers standing in for MCP servers, logging every request they parse, and
the harness that drives raw bytes at them through credless on the real kernel (used by
tests/integration/test_smuggling_corpus.py and test_differential.py):

- node_upstream.mjs: Node's `http` (llhttp); h11_upstream.py: uvicorn with h11;
- attacker.py: the workload in the managed cgroup that writes the bytes;
- wire.py: the corpus format and a lenient response splitter;
- harness.py: the world (authorization server, upstreams, agent, attacker);
- oracle.py: what an exchange may and may not have caused upstream;
- echo.py: the recording echo upstream of the proxy's other kernel tests.
"""
