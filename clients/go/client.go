// Package voicemesh is the Go client of the voicemesh orchestrator's Converse API.
//
//	c, err := voicemesh.Dial(ctx, "127.0.0.1:50051", voicemesh.WithToken(tok))
//	s, err := c.Start(ctx, &pb.SessionConfig{SystemPrompt: "Be brief."})
//	s.SendText("hello")
//	for ev := range s.Events() { ... }   // closed when the stream ends
//	err = s.Err()                         // nil, or a gRPC status error (status.FromError)
//
// Messages are the contract's (package voicemeshv1, generated from protos/ at build time).
package voicemesh

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	pb "voicemesh.dev/client/voicemeshv1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// AddrEnv names the variable that holds the orchestrator's address.
const AddrEnv = "VOICEMESH_ORCHESTRATOR_ADDR"

const maxMessageBytes = 4 << 20

// DefaultAddr is $VOICEMESH_ORCHESTRATOR_ADDR, or 127.0.0.1:50051.
func DefaultAddr() string {
	if addr := os.Getenv(AddrEnv); addr != "" {
		return addr
	}
	return "127.0.0.1:50051"
}

// DefaultInputFormat and DefaultOutputFormat are sent when a config names no format: the
// server's defaults, made explicit so a session never depends on an unstated default.
func DefaultInputFormat() *pb.AudioFormat {
	return &pb.AudioFormat{Encoding: pb.AudioEncoding_AUDIO_ENCODING_PCM16, SampleRateHz: 16000, Channels: 1}
}

// DefaultOutputFormat: PCM16 24 kHz mono.
func DefaultOutputFormat() *pb.AudioFormat {
	return &pb.AudioFormat{Encoding: pb.AudioEncoding_AUDIO_ENCODING_PCM16, SampleRateHz: 24000, Channels: 1}
}

type options struct {
	tls      *tls.Config
	tlsFiles *TLSFiles
	apiKey   *string // nil: from the environment
	secure   bool
	md       metadata.MD
	dialOpts []grpc.DialOption
}

// Option configures Dial.
type Option func(*options)

// WithTLS connects over TLS with this configuration (nil fields: the system roots).
func WithTLS(cfg *tls.Config) Option { return func(o *options) { o.tls = cfg } }

// WithTLSFiles connects over TLS with a CA, client certificate and server name from PEM files.
// Without WithTLS or WithTLSFiles, Dial uses VOICEMESH_CLIENT_TLS_* when any is set.
func WithTLSFiles(files TLSFiles) Option { return func(o *options) { o.tlsFiles = &files } }

// WithAPIKey sends "authorization: Bearer <key>" on every call ("": none). Without it, Dial
// uses $VOICEMESH_API_KEY, else the content of the file $VOICEMESH_API_KEY_FILE.
func WithAPIKey(key string) Option {
	return func(o *options) { key = strings.TrimSpace(key); o.apiKey = &key }
}

// WithToken is WithAPIKey (the older name).
func WithToken(token string) Option { return WithAPIKey(token) }

// WithMetadata adds key/value pairs to every call's metadata.
func WithMetadata(kv ...string) Option {
	return func(o *options) {
		for i := 0; i+1 < len(kv); i += 2 {
			o.md.Append(kv[i], kv[i+1])
		}
	}
}

// WithDialOptions passes further options to grpc.Dial.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) { o.dialOpts = append(o.dialOpts, opts...) }
}

// Client holds one channel to the orchestrator; sessions share it.
type Client struct {
	conn   *grpc.ClientConn
	stub   pb.OrchestratorServiceClient
	md     metadata.MD
	addr   string
	secure bool // TLS, for the hint of an unreachable orchestrator
}

// Dial opens the channel (lazily: errors show on the first call).
func Dial(ctx context.Context, addr string, opts ...Option) (*Client, error) {
	o := options{md: metadata.MD{}}
	for _, opt := range opts {
		opt(&o)
	}
	security, err := o.credentials()
	if err != nil {
		return nil, err
	}
	dial := append(append(security,
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessageBytes), grpc.MaxCallSendMsgSize(maxMessageBytes)),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 20 * time.Second, Timeout: 10 * time.Second, PermitWithoutStream: true}),
	), o.dialOpts...)
	conn, err := grpc.DialContext(ctx, addr, dial...)
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, stub: pb.NewOrchestratorServiceClient(conn), md: o.md, addr: addr, secure: o.secure}, nil
}

// Close closes the channel.
func (c *Client) Close() error { return c.conn.Close() }

func (c *Client) outgoing(ctx context.Context) context.Context {
	if len(c.md) == 0 {
		return ctx
	}
	return metadata.NewOutgoingContext(ctx, metadata.Join(c.md))
}

// Info reports the orchestrator's version and its services.
func (c *Client) Info(ctx context.Context) (*pb.OrchestratorServiceInfoResponse, error) {
	return c.stub.Info(c.outgoing(ctx), &pb.OrchestratorServiceInfoRequest{})
}

// NewTool is a Tool whose JSON schema is given as a Go value (marshalled to JSON).
func NewTool(name, description string, schema interface{}) (*pb.Tool, error) {
	raw, err := json.Marshal(schema)
	if err != nil {
		return nil, err
	}
	return &pb.Tool{Name: name, Description: description, ParametersJson: string(raw)}, nil
}

// Session is one Converse call. Read Events until it is closed, then Err.
type Session struct {
	stream    pb.OrchestratorService_ConverseClient
	cancel    context.CancelFunc
	id        string
	outFormat *pb.AudioFormat
	events    chan *pb.ConverseResponse
	done      chan struct{}
	err       error
	sendMu    sync.Mutex
	halfClose bool
	aborted   bool
	ctx       context.Context // the call's context: done when the session is cancelled
}

// Start opens a Converse call, sends cfg (not modified; unset formats get the defaults) and
// returns once SessionStarted came. A refused config comes back as a status error, e.g.
// codes.InvalidArgument. ctx bounds the whole session; cancelling it drops the call.
func (c *Client) Start(ctx context.Context, cfg *pb.SessionConfig) (*Session, error) {
	config := &pb.SessionConfig{}
	if cfg != nil {
		config = proto.Clone(cfg).(*pb.SessionConfig)
	}
	if config.InputFormat == nil {
		config.InputFormat = DefaultInputFormat()
	}
	if config.OutputFormat == nil {
		config.OutputFormat = DefaultOutputFormat()
	}
	callCtx, cancel := context.WithCancel(c.outgoing(ctx))
	stream, err := c.stub.Converse(callCtx)
	if err != nil {
		cancel()
		return nil, c.explain(err)
	}
	if err := stream.Send(&pb.ConverseRequest{Request: &pb.ConverseRequest_Config{Config: config}}); err != nil && err != io.EOF {
		cancel()
		return nil, c.explain(err)
	}
	first, err := stream.Recv()
	if err != nil {
		cancel()
		if err == io.EOF {
			err = status.Error(codes.Internal, "the stream closed before SessionStarted")
		}
		if _, headerErr := stream.Header(); headerErr == nil {
			return nil, err // the orchestrator answered: its status says what is wrong, not the connection
		}
		return nil, c.explain(err)
	}
	started := first.GetSessionStarted()
	if started == nil {
		cancel()
		return nil, status.Errorf(codes.Internal, "first event was %T, not SessionStarted", first.GetEvent())
	}
	s := &Session{stream: stream, cancel: cancel, ctx: callCtx, id: started.GetSessionId(), outFormat: started.GetOutputFormat(),
		events: make(chan *pb.ConverseResponse, 256), done: make(chan struct{})}
	go s.read()
	return s, nil
}

func (s *Session) read() {
	defer close(s.done)
	defer close(s.events)
	for {
		ev, err := s.stream.Recv()
		if err == io.EOF {
			return
		}
		if err != nil {
			s.sendMu.Lock()
			aborted := s.aborted
			s.sendMu.Unlock()
			if !(aborted && status.Code(err) == codes.Canceled) {
				s.err = err
			}
			return
		}
		// A caller that stopped reading must not pin this goroutine: cancelling the Start
		// context (or Close) releases it.
		select {
		case s.events <- ev:
		case <-s.ctx.Done():
			return
		}
	}
}

// ID is the session id (client-chosen or assigned).
func (s *Session) ID() string { return s.id }

// OutputFormat is the format bot audio arrives in.
func (s *Session) OutputFormat() *pb.AudioFormat { return s.outFormat }

// Events delivers every event after SessionStarted; closed when the stream ends.
func (s *Session) Events() <-chan *pb.ConverseResponse { return s.events }

// Done is closed when the stream is over.
func (s *Session) Done() <-chan struct{} { return s.done }

// Err is nil while the stream is open or after it ended with OK; else its status error.
func (s *Session) Err() error {
	select {
	case <-s.done:
		return s.err
	default:
		return nil
	}
}

// ErrClosed is returned by the Send methods after End, Cancel or the end of the stream.
var ErrClosed = errors.New("voicemesh: session closed for sending")

// Send sends any request. Safe for concurrent use.
func (s *Session) Send(req *pb.ConverseRequest) error {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	if s.halfClose {
		return ErrClosed
	}
	if err := s.stream.Send(req); err != nil {
		if err == io.EOF {
			return ErrClosed // the stream is over: Err says why
		}
		return err
	}
	return nil
}

// SendAudio sends caller audio in the session's input format (20-100 ms a chunk).
func (s *Session) SendAudio(data []byte) error {
	return s.Send(&pb.ConverseRequest{Request: &pb.ConverseRequest_Audio{Audio: &pb.AudioChunk{Data: data}}})
}

// SendText sends a typed user turn.
func (s *Session) SendText(text string) error {
	return s.Send(&pb.ConverseRequest{Request: &pb.ConverseRequest_Text{Text: &pb.TextInput{Text: text}}})
}

// SendToolResult answers a ToolCallRequested.
func (s *Session) SendToolResult(result *pb.ToolCallResult) error {
	return s.Send(&pb.ConverseRequest{Request: &pb.ConverseRequest_ToolResult{ToolResult: result}})
}

// Control sends a control (say, interrupt, mute, context, end, cancel).
func (s *Session) Control(ctl *pb.SessionControl) error {
	return s.Send(&pb.ConverseRequest{Request: &pb.ConverseRequest_Control{Control: ctl}})
}

// Say speaks text now. Interrupt stops the bot. Mute turns the user's audio off or on.
func (s *Session) Say(text string) error {
	return s.Control(&pb.SessionControl{Action: &pb.SessionControl_Say{Say: &pb.Say{Text: text}}})
}

// Interrupt stops the bot, as a barge-in would.
func (s *Session) Interrupt() error {
	return s.Control(&pb.SessionControl{Action: &pb.SessionControl_Interrupt{Interrupt: &pb.Interrupt{}}})
}

// Mute ignores (true) or hears again (false) the user's audio.
func (s *Session) Mute(muted bool) error {
	return s.Control(&pb.SessionControl{Action: &pb.SessionControl_Mute{Mute: &pb.Mute{Muted: muted}}})
}

// End finishes gracefully (the current reply plays out) and half-closes. Events still
// arrive until SessionEnded; read them, or call Wait.
func (s *Session) End() error {
	return s.closeWith(&pb.SessionControl{Action: &pb.SessionControl_End{End: &pb.EndSession{}}})
}

// Cancel ends the session now (SessionEnded REASON_CANCELLED) and half-closes.
func (s *Session) Cancel() error {
	return s.closeWith(&pb.SessionControl{Action: &pb.SessionControl_Cancel{Cancel: &pb.CancelSession{}}})
}

func (s *Session) closeWith(ctl *pb.SessionControl) error {
	err := s.Control(ctl)
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	if !s.halfClose {
		s.halfClose = true
		if cerr := s.stream.CloseSend(); err == nil {
			err = cerr
		}
	}
	if err == ErrClosed {
		return nil
	}
	return err
}

// Wait waits for the stream to end (draining unread events) or ctx; returns Err.
func (s *Session) Wait(ctx context.Context) error {
	for {
		select {
		case _, ok := <-s.events:
			if !ok {
				<-s.done
				return s.err
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Close drops the call at once (no SessionEnded; not reported as an error) and frees it.
func (s *Session) Close() {
	s.sendMu.Lock()
	s.aborted = true
	s.sendMu.Unlock()
	s.cancel()
	go func() {
		for range s.events { // let the reader finish
		}
	}()
	<-s.done
}

// Describe names an event for logs and test failures, e.g. "turn_ended(1,REASON_ANSWERED)".
func Describe(ev *pb.ConverseResponse) string {
	switch e := ev.GetEvent().(type) {
	case *pb.ConverseResponse_Speaking:
		return "speaking:" + e.Speaking.GetKind().String()
	case *pb.ConverseResponse_UserTranscript:
		if !e.UserTranscript.GetIsFinal() {
			return "user_transcript:interim"
		}
		return fmt.Sprintf("user_transcript(%q)", e.UserTranscript.GetText())
	case *pb.ConverseResponse_BotText:
		return fmt.Sprintf("bot_text(%q)", e.BotText.GetText())
	case *pb.ConverseResponse_TurnEnded:
		return fmt.Sprintf("turn_ended(%d,%s)", e.TurnEnded.GetTurnNumber(), e.TurnEnded.GetReason())
	case *pb.ConverseResponse_Error:
		return fmt.Sprintf("error(%s: %s)", e.Error.GetCode(), e.Error.GetMessage())
	case nil:
		return "empty"
	default:
		name := fmt.Sprintf("%T", e)
		return name[len("*voicemeshv1.ConverseResponse_"):]
	}
}
