// Command goportable is a real Go portable plugin for the handshake tests: it starts the way a plugin built on
// eKuiper's Go SDK does, over the same nanomsg library (mangos v3) at the version the engine links.
//
// eKuiper's runtime runs a Go portable plugin as `<executable> '{"sendTimeout":1000}'` in the executable's
// folder, after listening with a Rep socket on ipc:///tmp/plugin_<name>.ipc. The SDK then reads that JSON
// argument, makes a Req socket, dials the control socket at once (a refused dial is fatal, there is no retry
// in the background), sends "handshake", and serves the engine's commands on that socket until it is
// stopped. This program does the same, with no sources, sinks or functions to offer: every command is
// answered as the SDK answers a symbol it does not have.
//
// The plugin's name is its executable's file name (an SDK plugin has its name compiled in; a test can
// install this one binary under any name). What it learns at start goes to stdout, which the check keeps.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"go.nanomsg.org/mangos/v3"
	"go.nanomsg.org/mangos/v3/protocol/req"
	// the ipc:// transport registers itself
	_ "go.nanomsg.org/mangos/v3/transport/ipc"
)

// portableConfig is the JSON the runtime passes as the only argument (eKuiper's PortableConfig).
type portableConfig struct {
	SendTimeout int64 `json:"sendTimeout"`
}

func main() {
	name := filepath.Base(os.Args[0])
	cwd, _ := os.Getwd()
	fmt.Printf("%s started in %s with %q\n", name, cwd, os.Args[1:])
	fmt.Printf("%s runs as uid %d gid %d\n", name, os.Getuid(), os.Getgid())
	if len(os.Args) == 2 {
		config := portableConfig{}
		if err := json.Unmarshal([]byte(os.Args[1]), &config); err != nil {
			fail(fmt.Sprintf("fail to parse args %q: %v", os.Args[1:], err))
		}
		fmt.Printf("%s config parsed: sendTimeout %d\n", name, config.SendTimeout)
	}

	sock, err := req.NewSocket()
	if err != nil {
		fail(fmt.Sprintf("can't get new req socket: %v", err))
	}
	// No socket option is set. The SDK asks for a send deadline of sendTimeout and for no resending, but
	// passes both as plain numbers, which mangos refuses (it takes a time.Duration) and the SDK ignores:
	// its control socket keeps mangos's defaults, no send deadline and a resend after a minute.
	url := fmt.Sprintf("ipc:///tmp/plugin_%s.ipc", name)
	fmt.Printf("%s dialing %s\n", name, url)
	if err := sock.DialOptions(url, map[string]any{mangos.OptionDialAsynch: false}); err != nil {
		fail(fmt.Sprintf("can't dial on req socket: %v", err))
	}
	if err := sock.Send([]byte("handshake")); err != nil {
		fail(fmt.Sprintf("can't send handshake: %v", err))
	}
	fmt.Printf("%s sent its handshake\n", name)

	go serve(name, sock)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	<-stop
	fmt.Printf("%s stopping\n", name)
	os.Exit(0)
}

// serve answers the engine's commands until the control socket fails, then ends the plugin as the SDK does.
func serve(name string, sock mangos.Socket) {
	for {
		command, err := sock.Recv()
		if err != nil {
			fail(fmt.Sprintf("cannot receive on rep socket: %v", err))
		}
		fmt.Printf("%s received command %s\n", name, command)
		if err := sock.Send([]byte("symbol not found")); err != nil {
			fail(fmt.Sprintf("can't send reply: %v", err))
		}
	}
}

// fail ends the plugin with status 1 after saying why on stderr, which the check keeps with stdout.
func fail(why string) {
	fmt.Fprintln(os.Stderr, why)
	os.Exit(1)
}
