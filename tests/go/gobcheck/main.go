// Command gobcheck answers, with Go's own encoding/gob and encoding/json, what the
// Python side of kuiper-plugins must agree with. It reads one JSON or hex value on
// stdin and writes the answer on stdout; any failure goes to stderr with exit code 1.
//
//	gobcheck encode-string     JSON string on stdin   -> hex of its gob stream
//	gobcheck encode-strings    JSON []string on stdin -> hex of its gob stream
//	gobcheck decode-string     hex on stdin           -> the decoded string as JSON
//	gobcheck decode-strings    hex on stdin           -> the decoded []string as JSON
//	gobcheck marshal-ioplugin  JSON {name, file, shellParas} -> {"json": ..., "gob": hex}
//
// Decoding refuses trailing bytes after the first value, so a stream that decodes here
// holds exactly one value of the asked type.
package main

import (
	"bytes"
	"encoding/gob"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// ioPlugin has the field names, order and tags of the plugin description whose
// json.Marshal output eKuiper stores as a plugin's install script.
type ioPlugin struct {
	Name       string   `json:"name"`
	File       string   `json:"file"`
	ShellParas []string `json:"shellParas,omitempty"`
}

func encode(value interface{}) (string, error) {
	var buf bytes.Buffer
	if err := gob.NewEncoder(&buf).Encode(value); err != nil {
		return "", err
	}
	return hex.EncodeToString(buf.Bytes()), nil
}

func decode(text string, into interface{}) error {
	raw, err := hex.DecodeString(strings.TrimSpace(text))
	if err != nil {
		return fmt.Errorf("stdin is not hex: %w", err)
	}
	buf := bytes.NewBuffer(raw)
	if err := gob.NewDecoder(buf).Decode(into); err != nil {
		return err
	}
	if buf.Len() != 0 {
		return fmt.Errorf("%d trailing bytes after the value", buf.Len())
	}
	return nil
}

func printJSON(value interface{}) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	return enc.Encode(value)
}

func run(command string, input []byte) error {
	switch command {
	case "encode-string":
		var s string
		if err := json.Unmarshal(input, &s); err != nil {
			return err
		}
		out, err := encode(s)
		if err != nil {
			return err
		}
		fmt.Println(out)
	case "encode-strings":
		var l []string
		if err := json.Unmarshal(input, &l); err != nil {
			return err
		}
		if l == nil {
			return errors.New("expected a JSON array")
		}
		out, err := encode(l)
		if err != nil {
			return err
		}
		fmt.Println(out)
	case "decode-string":
		var s string
		if err := decode(string(input), &s); err != nil {
			return err
		}
		return printJSON(s)
	case "decode-strings":
		l := make([]string, 0)
		if err := decode(string(input), &l); err != nil {
			return err
		}
		return printJSON(l)
	case "marshal-ioplugin":
		var p ioPlugin
		if err := json.Unmarshal(input, &p); err != nil {
			return err
		}
		text, err := json.Marshal(&p)
		if err != nil {
			return err
		}
		out, err := encode(string(text))
		if err != nil {
			return err
		}
		return printJSON(map[string]string{"json": string(text), "gob": out})
	default:
		return fmt.Errorf("unknown command %q", command)
	}
	return nil
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: gobcheck encode-string|encode-strings|decode-string|decode-strings|marshal-ioplugin < input")
		os.Exit(2)
	}
	input, err := io.ReadAll(os.Stdin)
	if err == nil {
		err = run(os.Args[1], input)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "gobcheck:", err)
		os.Exit(1)
	}
}
