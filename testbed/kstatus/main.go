// Command kstatus prints the health Flux gives each object of a JSON document on stdin (a List, such as
// `kubectl get -o json` prints, or one object): the status kstatus computes, as Flux's health checks and
// `flux` itself compute it, one JSON line per object. The bed asks the library itself rather than a copy of
// its rules, so that a change in either vmop's conditions or the library shows.
//
// The module is github.com/fluxcd/cli-utils, the fork of sigs.k8s.io/cli-utils that Flux's controllers
// import (the upstream's last release, v0.37.2, is built on apimachinery v0.30); v1.0.0 is on apimachinery
// v0.35, the bed's line. Its kstatus/status package is upstream v0.37.2's, import paths aside.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/fluxcd/cli-utils/pkg/kstatus/status"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
)

type verdict struct {
	Name    string `json:"name"`
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(1)
	}
}

func run(in io.Reader, out io.Writer) error {
	data, err := io.ReadAll(in)
	if err != nil {
		return err
	}
	// apimachinery's decoder, as the API machinery's own: integers stay int64, which is what kstatus reads
	// metadata.generation and status.observedGeneration as (encoding/json would make them float64).
	var document map[string]interface{}
	if err := utiljson.Unmarshal(data, &document); err != nil {
		return err
	}
	objects := []interface{}{document}
	if items, isList := document["items"].([]interface{}); isList {
		objects = items
	}
	encoder := json.NewEncoder(out)
	for _, object := range objects {
		content, isObject := object.(map[string]interface{})
		if !isObject {
			return fmt.Errorf("an item is not an object: %v", object)
		}
		u := &unstructured.Unstructured{Object: content}
		result, err := status.Compute(u)
		if err != nil {
			return fmt.Errorf("%s: %w", u.GetName(), err)
		}
		if err := encoder.Encode(verdict{Name: u.GetName(), Status: result.Status.String(), Message: result.Message}); err != nil {
			return err
		}
	}
	return nil
}
