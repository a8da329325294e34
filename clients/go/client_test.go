package voicemesh_test

// The Go client against a running orchestrator: VOICEMESH_ORCHESTRATOR_ADDR=host:port go test
// (tests/test_clients_node_go.py starts the orchestrator with fake services behind it and runs this).
// The fakes' script: services/runtime/voicemesh/runtime/fakes.py. Waits have deadlines and say
// what was seen; nothing asserts on speed.

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	voicemesh "voicemesh.dev/client"
	pb "voicemesh.dev/client/voicemeshv1"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const (
	waitFor = 60 * time.Second // a liveness bound, never a speed claim
	rate    = 16000
	chunkMs = 40
)

func addr(t *testing.T) string {
	a := os.Getenv(voicemesh.AddrEnv)
	if a == "" {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is not set (CI=true: no skipping)", voicemesh.AddrEnv)
		}
		t.Skipf("set %s to a running orchestrator", voicemesh.AddrEnv)
	}
	return a
}

// recorder keeps every event of a session; wait blocks until one matches or the deadline.
type recorder struct {
	mu      sync.Mutex
	events  []*pb.ConverseResponse
	changed chan struct{}
	closed  bool
	err     error
}

func record(s *voicemesh.Session) *recorder {
	r := &recorder{changed: make(chan struct{})}
	go func() {
		for ev := range s.Events() {
			r.mu.Lock()
			r.events = append(r.events, ev)
			close(r.changed)
			r.changed = make(chan struct{})
			r.mu.Unlock()
		}
		<-s.Done()
		r.mu.Lock()
		r.closed, r.err = true, s.Err()
		close(r.changed)
		r.changed = make(chan struct{})
		r.mu.Unlock()
	}()
	return r
}

func (r *recorder) kinds() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var names []string
	for _, ev := range r.events {
		if ev.GetAudio() == nil {
			names = append(names, voicemesh.Describe(ev))
		}
	}
	return strings.Join(names, ", ")
}

func (r *recorder) wait(t *testing.T, what string, pred func(*pb.ConverseResponse) bool) *pb.ConverseResponse {
	t.Helper()
	deadline := time.After(waitFor)
	seen := 0
	for {
		r.mu.Lock()
		for ; seen < len(r.events); seen++ {
			if pred(r.events[seen]) {
				ev := r.events[seen]
				r.mu.Unlock()
				return ev
			}
		}
		closed, err, changed := r.closed, r.err, r.changed
		r.mu.Unlock()
		if closed {
			t.Fatalf("stream ended (%v) before %s; events: %s", err, what, r.kinds())
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("no %s within %s; events: %s", what, waitFor, r.kinds())
		}
	}
}

func (r *recorder) all() []*pb.ConverseResponse {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*pb.ConverseResponse(nil), r.events...)
}

func turnEnded(n uint32) func(*pb.ConverseResponse) bool {
	return func(ev *pb.ConverseResponse) bool {
		return ev.GetTurnEnded() != nil && ev.GetTurnEnded().GetTurnNumber() == n
	}
}

func sessionEnded(reason pb.SessionEnded_Reason) func(*pb.ConverseResponse) bool {
	return func(ev *pb.ConverseResponse) bool {
		return ev.GetSessionEnded() != nil && ev.GetSessionEnded().GetReason() == reason
	}
}

func botTexts(r *recorder) []string {
	var out []string
	for _, ev := range r.all() {
		if b := ev.GetBotText(); b != nil {
			out = append(out, b.GetText())
		}
	}
	return out
}

// tone is PCM16 16 kHz mono at 220 Hz: speech to the fake VAD. silence is zeros.
func tone(seconds float64) []byte {
	n := int(seconds * rate)
	buf := make([]byte, 2*n)
	for i := 0; i < n; i++ {
		binary.LittleEndian.PutUint16(buf[2*i:], uint16(int16(8000*math.Sin(2*math.Pi*220*float64(i)/rate))))
	}
	return buf
}

func silence(seconds float64) []byte { return make([]byte, 2*int(seconds*rate)) }

// speakUntil sends audio in real time (pacing, not synchronisation), then silence, until an
// event matches.
func speakUntil(t *testing.T, s *voicemesh.Session, r *recorder, audio []byte, what string, pred func(*pb.ConverseResponse) bool) *pb.ConverseResponse {
	t.Helper()
	stop := make(chan struct{})
	micDone := make(chan struct{})
	go func() {
		defer close(micDone)
		step := 2 * rate * chunkMs / 1000
		start := time.Now()
		for i := 0; ; i++ {
			chunk := make([]byte, step)
			if i*step < len(audio) {
				copy(chunk, audio[i*step:])
			}
			if s.SendAudio(chunk) != nil {
				return
			}
			select {
			case <-stop:
				return
			case <-time.After(time.Until(start.Add(time.Duration(i+1) * chunkMs * time.Millisecond))):
			}
		}
	}()
	defer func() { close(stop); <-micDone }()
	return r.wait(t, what, pred)
}

func start(t *testing.T, cfg *pb.SessionConfig) (*voicemesh.Session, *recorder) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	c, err := voicemesh.Dial(ctx, addr(t))
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("start: %v", err)
	}
	t.Cleanup(func() { s.Close(); cancel(); c.Close() })
	return s, record(s)
}

func TestSpokenTurn(t *testing.T) {
	s, r := start(t, &pb.SessionConfig{Metrics: true})
	if s.ID() == "" || s.OutputFormat().GetSampleRateHz() != 24000 {
		t.Fatalf("SessionStarted: id %q, format %v", s.ID(), s.OutputFormat())
	}
	speakUntil(t, s, r, append(tone(1.0), silence(0.3)...), "TurnEnded of turn 1", turnEnded(1))
	var finals []string
	audio := 0
	var ended *pb.TurnEnded
	for _, ev := range r.all() {
		if u := ev.GetUserTranscript(); u != nil && u.GetIsFinal() {
			finals = append(finals, u.GetText())
		}
		if a := ev.GetAudio(); a != nil && a.GetTurnNumber() == 1 && len(a.GetChunk().GetData()) > 0 {
			audio++
		}
		if e := ev.GetTurnEnded(); e != nil {
			ended = e
		}
	}
	if len(finals) != 1 || finals[0] == "" {
		t.Fatalf("final transcripts %q; events: %s", finals, r.kinds())
	}
	if got := botTexts(r); len(got) != 1 || got[0] != "You said: "+finals[0]+"." {
		t.Fatalf("bot text %q; events: %s", got, r.kinds())
	}
	if ended.GetReason() != pb.TurnEnded_REASON_ANSWERED || audio == 0 {
		t.Fatalf("turn ended %v with %d audio chunks; events: %s", ended, audio, r.kinds())
	}
	if err := s.End(); err != nil {
		t.Fatal(err)
	}
	r.wait(t, "SessionEnded(ENDED)", sessionEnded(pb.SessionEnded_REASON_ENDED))
}

func TestTypedTurn(t *testing.T) {
	s, r := start(t, nil)
	if err := s.SendText("hello there"); err != nil {
		t.Fatal(err)
	}
	ended := r.wait(t, "TurnEnded of turn 1", turnEnded(1)).GetTurnEnded()
	if got := botTexts(r); len(got) != 1 || got[0] != "You said: hello there." || ended.GetReason() != pb.TurnEnded_REASON_ANSWERED {
		t.Fatalf("bot text %q, reason %v; events: %s", got, ended.GetReason(), r.kinds())
	}
	if err := s.End(); err != nil {
		t.Fatal(err)
	}
	r.wait(t, "SessionEnded(ENDED)", sessionEnded(pb.SessionEnded_REASON_ENDED))
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if err := s.Wait(ctx); err != nil {
		t.Fatalf("stream ended with %v", err)
	}
}

func TestToolCallAnsweredByTheClient(t *testing.T) {
	weather, err := voicemesh.NewTool("get_weather", "Weather in a city",
		map[string]interface{}{"type": "object", "properties": map[string]interface{}{"city": map[string]string{"type": "string"}}})
	if err != nil {
		t.Fatal(err)
	}
	s, r := start(t, &pb.SessionConfig{Tools: &pb.ToolOptions{Tools: []*pb.Tool{weather}}})
	if err := s.SendText("weather in Paris"); err != nil {
		t.Fatal(err)
	}
	call := r.wait(t, "ToolCallRequested", func(ev *pb.ConverseResponse) bool { return ev.GetToolCall() != nil }).GetToolCall()
	var args map[string]string
	if err := json.Unmarshal([]byte(call.GetArgumentsJson()), &args); err != nil || call.GetName() != "get_weather" || args["city"] != "Paris" {
		t.Fatalf("tool call %v (%v)", call, err)
	}
	if err := s.SendToolResult(&pb.ToolCallResult{ToolCallId: call.GetId(), Content: "sunny"}); err != nil {
		t.Fatal(err)
	}
	r.wait(t, "TurnEnded of turn 1", turnEnded(1))
	if got := botTexts(r); len(got) != 1 || got[0] != "The tools said: sunny." {
		t.Fatalf("bot text %q; events: %s", got, r.kinds())
	}
	if err := s.Cancel(); err != nil {
		t.Fatal(err)
	}
	r.wait(t, "SessionEnded(CANCELLED)", sessionEnded(pb.SessionEnded_REASON_CANCELLED))
}

func TestBargeInClearsPlayback(t *testing.T) {
	s, r := start(t, nil)
	if err := s.SendText("tell me a long story"); err != nil {
		t.Fatal(err)
	}
	r.wait(t, "BOT_STARTED", func(ev *pb.ConverseResponse) bool {
		return ev.GetSpeaking().GetKind() == pb.SpeakingEvent_KIND_BOT_STARTED
	})
	clear := speakUntil(t, s, r, tone(1.0), "ClearPlayback", func(ev *pb.ConverseResponse) bool { return ev.GetClearPlayback() != nil })
	if clear.GetClearPlayback().GetTurnNumber() != 1 {
		t.Fatalf("ClearPlayback for turn %d", clear.GetClearPlayback().GetTurnNumber())
	}
	ended := r.wait(t, "TurnEnded of turn 1", turnEnded(1)).GetTurnEnded()
	if !ended.GetInterrupted() || ended.GetReason() != pb.TurnEnded_REASON_INTERRUPTED {
		t.Fatalf("turn 1 ended %v; events: %s", ended, r.kinds())
	}
	if k := r.kinds(); strings.Index(k, "ClearPlayback") > strings.Index(k, "turn_ended(1,") {
		t.Fatalf("ClearPlayback after TurnEnded: %s", k)
	}
}

func TestBadConfigIsInvalidArgument(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	c, err := voicemesh.Dial(ctx, addr(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cfg := &pb.SessionConfig{InputFormat: &pb.AudioFormat{Encoding: pb.AudioEncoding_AUDIO_ENCODING_PCM16, SampleRateHz: 4000}}
	s, err := c.Start(ctx, cfg)
	if err == nil {
		s.Close()
		t.Fatal("a 4 kHz input format was accepted")
	}
	st, _ := status.FromError(err)
	if st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), "8000-48000") {
		t.Fatalf("got %v", err)
	}
}

// TestTalkExample builds cmd/talk and runs it on a WAV it writes: transcript, reply, latency
// and a reply WAV out.
func TestTalkExample(t *testing.T) {
	a := addr(t)
	dir := t.TempDir()
	bin := filepath.Join(dir, "talk")
	if out, err := exec.Command("go", "build", "-o", bin, "./cmd/talk").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	in, reply := filepath.Join(dir, "question.wav"), filepath.Join(dir, "reply.wav")
	pcm := append(append(silence(0.3), tone(1.0)...), silence(0.5)...)
	if err := os.WriteFile(in, voicemesh.EncodeWAV(pcm, voicemesh.DefaultInputFormat()), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-addr", a, "-json", "-out", reply, "-wait-after", "30s", in)
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("talk: %v\n%s", err, out)
	}
	var result struct {
		Turns []struct {
			UserTranscript string   `json:"user_transcript"`
			BotText        string   `json:"bot_text"`
			LatencyMs      *float64 `json:"latency_ms"`
			Reason         string   `json:"reason"`
		} `json:"turns"`
		AudioSeconds float64 `json:"audio_seconds"`
	}
	if err := json.Unmarshal(out, &result); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if len(result.Turns) != 1 {
		t.Fatalf("turns: %s", out)
	}
	turn := result.Turns[0]
	if turn.UserTranscript == "" || turn.BotText != "You said: "+turn.UserTranscript+"." || turn.Reason != "ANSWERED" ||
		turn.LatencyMs == nil || *turn.LatencyMs <= 0 || result.AudioSeconds <= 0 {
		t.Fatalf("talk result: %s", out)
	}
	raw, err := os.ReadFile(reply)
	if err != nil {
		t.Fatal(err)
	}
	format, data, err := voicemesh.DecodeWAV(raw)
	if err != nil || format.GetSampleRateHz() != 24000 || len(data) == 0 {
		t.Fatalf("reply WAV: %v, %v, %d bytes", err, format, len(data))
	}
}
