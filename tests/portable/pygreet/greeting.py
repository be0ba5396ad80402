"""Source: emit one greeting per configured interval."""

import time

from ekuiper import Context, Source


class Greeting(Source):
    def __init__(self):
        self.running = False
        self.text = "hello"
        self.interval = 1.0

    def configure(self, datasource: str, conf: dict):
        self.text = conf.get("text", self.text)
        self.interval = float(conf.get("interval", self.interval))

    def open(self, ctx: Context):
        self.running = True
        while self.running:
            ctx.emit({"greeting": self.text}, None)
            time.sleep(self.interval)

    def close(self, ctx: Context):
        self.running = False
