"""One value kept out of an answer relayed as it arrives (sans-IO; agent/inject/flows.py
applies it): assertion mode's client assertion, which an authorization server refusing it
may quote back in its error, to a workload that is to hold no credential.

Each occurrence becomes as many `*`: same length, so the framing the server gave (a
Content-Length, chunk sizes) stays true, and nothing else of the answer changes. The body
goes on as it arrives, less its last len(value) - 1 bytes, kept until the next piece shows
whether they begin the value, and given at the body's end (rest())."""

from __future__ import annotations


class Mask:
    def __init__(self, value: bytes):
        if not value or b"*" in value:
            raise ValueError("a mask is a non-empty value without '*'")
        self.value = value
        self._stars = b"*" * len(value)
        self._carry = b""

    def head(self, data: bytes) -> bytes:
        """A response head, whole: masked at once."""
        return data.replace(self.value, self._stars)

    def body(self, data: bytes) -> bytes:
        """What of the body can go now, masked; the rest waits for the next piece."""
        buf = (self._carry + data).replace(self.value, self._stars)
        cut = max(len(buf) - (len(self.value) - 1), 0)
        self._carry = buf[cut:]
        return buf[:cut]

    def rest(self) -> bytes:
        """The body's last bytes, at its end: no occurrence can begin in them any more."""
        rest, self._carry = self._carry, b""
        return rest
