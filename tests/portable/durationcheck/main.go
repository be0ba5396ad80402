// Command durationcheck answers, for each text in a JSON list on stdin, what Go's time.ParseDuration makes
// of it: {"ns": <nanoseconds>} or {"error": <Go's message>}, as a JSON list on stdout.
package main

import (
	"encoding/json"
	"os"
	"time"
)

type verdict struct {
	Nanoseconds *int64 `json:"ns,omitempty"`
	Error       string `json:"error,omitempty"`
}

func main() {
	var texts []string
	if err := json.NewDecoder(os.Stdin).Decode(&texts); err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
		os.Exit(2)
	}
	verdicts := make([]verdict, 0, len(texts))
	for _, text := range texts {
		d, err := time.ParseDuration(text)
		if err != nil {
			verdicts = append(verdicts, verdict{Error: err.Error()})
			continue
		}
		ns := int64(d)
		verdicts = append(verdicts, verdict{Nanoseconds: &ns})
	}
	if err := json.NewEncoder(os.Stdout).Encode(verdicts); err != nil {
		os.Exit(1)
	}
}
