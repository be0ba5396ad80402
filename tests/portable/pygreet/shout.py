"""Function: the upper-case form of its one string argument."""

from typing import Any

from ekuiper import Context, Function


class Shout(Function):
    def validate(self, args: list[Any]):
        return "" if len(args) == 1 else "shout takes exactly one argument"

    def exec(self, args: list[Any], ctx: Context) -> Any:
        return str(args[0]).upper()

    def is_aggregate(self):
        return False
