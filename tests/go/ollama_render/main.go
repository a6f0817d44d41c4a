// Renders Ollama Modelfile TEMPLATEs with Go's real text/template, fed the data shape Ollama's
// template/template.go gives a .Messages template: collate() merges consecutive same-role messages
// (not tool ones) and joins system contents into .System; the template sees System, Messages, Tools,
// Response, Prompt; the func map has Ollama's `json`; option missingkey=zero.
// Input (stdin): a JSON list of {"template", "messages", "tools"}; output (stdout): a JSON list of
// {"text"} or {"error"}. Standard library only, so it builds offline.
package main

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type ToolCallFunction struct {
	Name      string         `json:"name"`
	Arguments map[string]any `json:"arguments"`
}

type ToolCall struct {
	Function ToolCallFunction `json:"function"`
}

type Message struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	Thinking  string     `json:"thinking,omitempty"`
	ToolCalls []ToolCall `json:"tool_calls,omitempty"`
	ToolName  string     `json:"tool_name,omitempty"`
}

type ToolFunction struct {
	Name        string         `json:"name"`
	Description string         `json:"description"`
	Parameters  map[string]any `json:"parameters"`
}

type Tool struct {
	Type     string       `json:"type"`
	Function ToolFunction `json:"function"`
}

type Case struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
	Tools    []Tool    `json:"tools"`
}

type Result struct {
	Text  string `json:"text"`
	Error string `json:"error,omitempty"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func render(c Case) Result {
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Template)
	if err != nil {
		return Result{Error: err.Error()}
	}
	system, messages := collate(c.Messages)
	var b bytes.Buffer
	err = tmpl.Execute(&b, map[string]any{
		"System": system, "Messages": messages, "Tools": c.Tools, "Response": "", "Prompt": "",
	})
	if err != nil {
		return Result{Error: err.Error()}
	}
	return Result{Text: b.String()}
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
		os.Exit(2)
	}
	out := make([]Result, len(cases))
	for i, c := range cases {
		out[i] = render(c)
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
