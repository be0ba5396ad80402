"""Sink: count what it receives and print the count."""

from typing import Any

from ekuiper import Context, Sink


class Tally(Sink):
    def __init__(self):
        self.count = 0

    def configure(self, conf: dict):
        pass

    def open(self, ctx: Context):
        pass

    def collect(self, ctx: Context, data: Any):
        self.count += 1
        print(f"tally: {self.count}")
        ctx.ack_ok()

    def close(self, ctx: Context):
        pass
