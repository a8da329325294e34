package voicemesh_test

// Credentials (credentials.go): the Python client's env names and rules; no server needed.

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	voicemesh "voicemesh.dev/client"
)

func TestCredentialsFromTheEnvironment(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "key")
	if err := os.WriteFile(keyFile, []byte(" from-file \n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv(voicemesh.APIKeyEnv, "")
	t.Setenv(voicemesh.APIKeyFileEnv, keyFile)
	if key, err := voicemesh.DefaultAPIKey(); key != "from-file" || err != nil {
		t.Fatalf("key from the file: %q, %v", key, err)
	}
	t.Setenv(voicemesh.APIKeyEnv, "from-env")
	if key, _ := voicemesh.DefaultAPIKey(); key != "from-env" {
		t.Fatalf("VOICEMESH_API_KEY first: %q", key)
	}
	t.Setenv(voicemesh.APIKeyEnv, "")
	t.Setenv(voicemesh.APIKeyFileEnv, filepath.Join(dir, "absent"))
	if _, err := voicemesh.DefaultAPIKey(); err == nil || !strings.Contains(err.Error(), "cannot read the API key file") {
		t.Fatalf("an unreadable key file: %v", err)
	}
	if _, err := voicemesh.Dial(context.Background(), "127.0.0.1:1"); err == nil || !strings.Contains(err.Error(), "absent") {
		t.Fatalf("Dial with an unreadable key file: %v", err)
	}
	t.Setenv(voicemesh.APIKeyFileEnv, "")

	t.Setenv(voicemesh.TLSEnvPrefix+"SERVER_NAME", "orch")
	if files, ok := voicemesh.TLSFilesFromEnv(); !ok || files.ServerName != "orch" {
		t.Fatalf("TLS from the environment: %+v, %v", files, ok)
	}
	t.Setenv(voicemesh.TLSEnvPrefix+"CA_FILE", filepath.Join(dir, "ca.pem"))
	if _, err := voicemesh.Dial(context.Background(), "127.0.0.1:1"); err == nil ||
		!strings.Contains(err.Error(), "cannot read the CA certificate") {
		t.Fatalf("Dial with an unreadable CA: %v", err)
	}
	if _, err := (voicemesh.TLSFiles{CertFile: keyFile}).Config(); err == nil || !strings.Contains(err.Error(), "needs both") {
		t.Fatalf("a certificate without its key: %v", err)
	}
	if _, err := (voicemesh.TLSFiles{CAFile: keyFile}).Config(); err == nil || !strings.Contains(err.Error(), "no PEM certificate") {
		t.Fatalf("a CA file that is not PEM: %v", err)
	}
}
