"""A portable plugin in eKuiper's documented layout, for the handshake tests: one source, sink and function.

eKuiper starts it as `<pythonBin> -u pygreet.py <json>` in this folder; the SDK dials the control channel
and sends its handshake.
"""

import os
import sys

from ekuiper import PluginConfig, plugin
from greeting import Greeting
from shout import Shout
from tally import Tally

if __name__ == "__main__":
    # Shown in the check's output, so a test can see how the plugin was started.
    print(f"pygreet started in {os.getcwd()} with {sys.argv[1:]}, unbuffered: {sys.stdout.write_through}")
    config = PluginConfig(
        "pygreet",
        {"greeting": lambda: Greeting()},
        {"tally": lambda: Tally()},
        {"shout": lambda: Shout()},
    )
    plugin.start(config)
