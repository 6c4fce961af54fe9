#!/usr/bin/python3
"""Stream a generation from mistrald over D-Bus, as a desktop application would.

Uses GLib's Gio D-Bus API (Debian: python3-gi). The interface's contract is
systemd/dbus/org.mistrald.Mistrald1.xml.

    examples/dbus_client.py "The meaning of life is"             # session bus
    examples/dbus_client.py --system --chat "Tell me a fortune"  # the packaged daemon
    examples/dbus_client.py --max-tokens 32 --temperature 0 "Never"

The signals Token and Done are unicast to the connection that started the request, so the
client subscribes to them before calling Generate (or Chat) and keeps those carrying its
request id. Ctrl-C cancels the request (Cancel), and a client that disconnects has its
requests cancelled by the daemon.
"""

import argparse
import signal
import sys

from gi.repository import Gio, GLib

NAME = "org.mistrald.Mistrald1"
PATH = "/org/mistrald/Mistrald1"
IFACE = "org.mistrald.Mistrald1"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--system", action="store_true", help="use the system bus")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user message")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--usage", action="store_true", help="print token counts on stderr")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="keep generating past the end of the text (tests, benchmarks)")
    args = parser.parse_args()

    bus_type = Gio.BusType.SYSTEM if args.system else Gio.BusType.SESSION
    try:
        bus = Gio.bus_get_sync(bus_type, None)
    except GLib.Error as e:
        print(f"dbus_client.py: cannot connect to the bus: {e.message}", file=sys.stderr)
        return 3

    # Options are a{sv}: any integer or floating D-Bus type is accepted for numbers.
    options = {"max_tokens": GLib.Variant("u", args.max_tokens)}
    if args.temperature is not None:
        options["temperature"] = GLib.Variant("d", args.temperature)
    if args.seed is not None:
        options["seed"] = GLib.Variant("t", args.seed)
    if args.ignore_eos:
        options["ignore_eos"] = GLib.Variant("b", True)

    loop = GLib.MainLoop()
    state = {"id": None, "early": [], "status": 0}

    def on_token(request_id, text):
        sys.stdout.write(text)
        sys.stdout.flush()

    def on_done(request_id, text, finish_reason, usage):
        print()
        if args.usage:
            print(
                f"finish reason {finish_reason}, {usage.get('prompt_tokens', 0)} prompt tokens "
                f"({usage.get('cached_tokens', 0)} cached), "
                f"{usage.get('completion_tokens', 0)} completion tokens",
                file=sys.stderr,
            )
        if finish_reason in ("error", "cancelled"):
            print(f"dbus_client.py: {usage.get('error_message', finish_reason)}", file=sys.stderr)
            state["status"] = 130 if finish_reason == "cancelled" else 1
        elif finish_reason == "content_filter":
            print(f"dbus_client.py: the output was refused: {usage.get('refusal', '')}",
                  file=sys.stderr)
            state["status"] = 1
        loop.quit()

    def handle(member, values):
        if values[0] != state["id"]:
            return
        if member == "Token":
            on_token(*values)
        elif member == "Done":
            on_done(*values)

    def on_signal(connection, sender, path, interface, member, parameters):
        values = parameters.unpack()
        if state["id"] is None:
            # The daemon sends the reply (with the id) before the first signal; should a
            # main loop ever run them out of order, keep the signals until the id is known.
            state["early"].append((member, values))
            return
        handle(member, values)

    # Subscribe before calling: the signals follow the reply at once.
    for member in ("Token", "Done"):
        bus.signal_subscribe(NAME, IFACE, member, PATH, None, Gio.DBusSignalFlags.NONE,
                             on_signal)

    if args.chat:
        method, params = "Chat", GLib.Variant("(a(ss)a{sv})", ([("user", args.prompt)], options))
    else:
        method, params = "Generate", GLib.Variant("(sa{sv})", (args.prompt, options))

    def on_reply(connection, result):
        try:
            (request_id,) = connection.call_finish(result).unpack()
        except GLib.Error as e:
            # A named error: org.mistrald.Mistrald1.Error.Busy, .InvalidArgument, ...
            name = Gio.DBusError.get_remote_error(e) or "error"
            Gio.DBusError.strip_remote_error(e)
            print(f"dbus_client.py: {name}: {e.message}", file=sys.stderr)
            state["status"] = 4 if name.endswith(".Busy") else 1
            loop.quit()
            return
        state["id"] = request_id
        for member, values in state["early"]:
            handle(member, values)
        state["early"].clear()

    bus.call(NAME, PATH, IFACE, method, params, GLib.VariantType("(t)"),
             Gio.DBusCallFlags.NONE, -1, None, on_reply)

    def on_interrupt():
        if state["id"] is not None:
            bus.call_sync(NAME, PATH, IFACE, "Cancel", GLib.Variant("(t)", (state["id"],)),
                          None, Gio.DBusCallFlags.NONE, -1, None)
        else:
            loop.quit()
            state["status"] = 130
        return GLib.SOURCE_CONTINUE

    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, on_interrupt)
    loop.run()
    return state["status"]


if __name__ == "__main__":
    sys.exit(main())
