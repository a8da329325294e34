package voicemesh

// Credentials toward the orchestrator (docs/security.md): an API key, sent as
// "authorization: Bearer <key>" on every call, and TLS (mTLS with a client certificate).
// Options of Dial, else the environment, with the Python client's names and rules:
//
//	VOICEMESH_API_KEY, else the content of the file VOICEMESH_API_KEY_FILE;
//	VOICEMESH_CLIENT_TLS_CA_FILE (unset: the system's roots), _CERT_FILE + _KEY_FILE (mTLS),
//	_SERVER_NAME (check the certificate against this name instead of the address's host).
//
// Setting any of the TLS variables makes the channel TLS.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

// Environment variables read by Dial when no option sets the key or TLS.
const (
	APIKeyEnv     = "VOICEMESH_API_KEY"
	APIKeyFileEnv = "VOICEMESH_API_KEY_FILE"
	TLSEnvPrefix  = "VOICEMESH_CLIENT_TLS_" // + CA_FILE, CERT_FILE, KEY_FILE, SERVER_NAME
)

// TLSFiles names PEM files: the CA that signed the orchestrator's certificate (empty: the
// system's roots), this client's certificate and key (both or neither, for mTLS), and the name
// to check the certificate against (empty: the address's host).
type TLSFiles struct {
	CAFile, CertFile, KeyFile, ServerName string
}

// TLSFilesFromEnv reads VOICEMESH_CLIENT_TLS_*; ok is false when none is set.
func TLSFilesFromEnv() (files TLSFiles, ok bool) {
	get := func(part string) string { return strings.TrimSpace(os.Getenv(TLSEnvPrefix + part)) }
	files = TLSFiles{CAFile: get("CA_FILE"), CertFile: get("CERT_FILE"), KeyFile: get("KEY_FILE"), ServerName: get("SERVER_NAME")}
	return files, files != TLSFiles{}
}

// Config is the tls.Config these files make.
func (f TLSFiles) Config() (*tls.Config, error) {
	cfg := &tls.Config{ServerName: f.ServerName}
	if f.CAFile != "" {
		pem, err := readFile(f.CAFile, "CA certificate")
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("the CA certificate %s holds no PEM certificate", f.CAFile)
		}
		cfg.RootCAs = pool
	}
	if (f.CertFile == "") != (f.KeyFile == "") {
		return nil, errors.New("a client certificate needs both its certificate and its key (CertFile and KeyFile)")
	}
	if f.CertFile != "" {
		pair, err := tls.LoadX509KeyPair(f.CertFile, f.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("client certificate %s / key %s: %v", f.CertFile, f.KeyFile, err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}

// DefaultAPIKey is $VOICEMESH_API_KEY, else the content of the file $VOICEMESH_API_KEY_FILE
// names, else "".
func DefaultAPIKey() (string, error) {
	if key := strings.TrimSpace(os.Getenv(APIKeyEnv)); key != "" {
		return key, nil
	}
	path := strings.TrimSpace(os.Getenv(APIKeyFileEnv))
	if path == "" {
		return "", nil
	}
	raw, err := readFile(path, "API key file")
	return strings.TrimSpace(string(raw)), err
}

func readFile(path, what string) ([]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		var pathErr *os.PathError
		if errors.As(err, &pathErr) {
			err = pathErr.Err
		}
		return nil, fmt.Errorf("cannot read the %s %s: %v", what, path, err)
	}
	return raw, nil
}

// credentials: TLS (options, else the environment) or plaintext, and the API key's per-RPC
// credential (option, else the environment) when there is a key.
func (o *options) credentials() ([]grpc.DialOption, error) {
	cfg := o.tls
	if cfg == nil && o.tlsFiles == nil {
		if files, ok := TLSFilesFromEnv(); ok {
			o.tlsFiles = &files
		}
	}
	if cfg == nil && o.tlsFiles != nil {
		var err error
		if cfg, err = o.tlsFiles.Config(); err != nil {
			return nil, err
		}
	}
	security := []grpc.DialOption{grpc.WithInsecure()}
	o.secure = cfg != nil
	if o.secure {
		security[0] = grpc.WithTransportCredentials(credentials.NewTLS(cfg))
	}
	key := ""
	if o.apiKey != nil {
		key = *o.apiKey
	} else {
		var err error
		if key, err = DefaultAPIKey(); err != nil {
			return nil, err
		}
	}
	if key != "" {
		security = append(security, grpc.WithPerRPCCredentials(bearer(key)))
	}
	return security, nil
}

// bearer is the per-RPC credential of an API key. It works on plaintext channels too, as the
// Python client's key does: behind a sidecar or proxy that does the TLS, the hop to it is
// plaintext.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (b bearer) RequireTransportSecurity() bool { return false }

// explain adds what to check to an UNAVAILABLE status of a call that never started (the code
// stays): gRPC's own message says only that the connection failed, not that TLS settings are a
// usual cause.
func (c *Client) explain(err error) error {
	st, ok := status.FromError(err)
	if !ok || st.Code() != codes.Unavailable {
		return err
	}
	hint := "is it up there? If it serves TLS, set " + TLSEnvPrefix + "CA_FILE (docs/security.md)"
	over := "plaintext"
	if c.secure {
		over = "TLS"
		hint = "is it up there? If it refused the handshake: with mTLS it needs a client certificate (" + TLSEnvPrefix +
			"CERT_FILE and _KEY_FILE) from a CA it trusts; its own certificate must chain to " + TLSEnvPrefix +
			"CA_FILE and name the host (or " + TLSEnvPrefix + "SERVER_NAME)"
	}
	return status.Errorf(codes.Unavailable, "%s (no connection to the orchestrator at %s over %s: %s)", st.Message(), c.addr, over, hint)
}
