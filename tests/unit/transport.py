"""A stand-in for an asyncio transport, for the proxy's protocols without sockets: it keeps
what was written and whether it was closed."""


class Transport:
    def __init__(self):
        self.out = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, _name):
        return None
