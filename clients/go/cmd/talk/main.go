// talk: a WAV in (streamed in real time, as a microphone would), the conversation out.
//
//	talk [-addr host:port] [-out reply.wav] [-json] [-system-prompt T] [-voice V] [-wait-after 20s]
//	     [-api-key K] [-tls] [-ca-file F] [-cert-file F -key-file F] [-server-name N] IN.wav
//
// The key and TLS default to the environment, as for `voicemesh talk`: VOICEMESH_API_KEY (or
// _FILE) and VOICEMESH_CLIENT_TLS_CA_FILE, _CERT_FILE, _KEY_FILE, _SERVER_NAME (docs/clients.md).
//
// Prints each turn (transcript, reply, latency) or, with -json, one JSON object like
// `voicemesh talk --json`. Latency is measured from the input audio itself: a speech segment
// ends when the chunk holding its last loud sample is sent; the turn's latency runs from then
// to the first bot audio of the reply that follows.
package main

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	voicemesh "voicemesh.dev/client"
	pb "voicemesh.dev/client/voicemeshv1"
)

const chunkMs = 40

type turn struct {
	Number          uint32   `json:"number"`
	UserTranscript  string   `json:"user_transcript"`
	BotText         string   `json:"bot_text"`
	LatencyMs       *float64 `json:"latency_ms"`
	ServerLatencyMs *float64 `json:"server_latency_ms"`
	Interrupted     bool     `json:"interrupted"`
	Reason          string   `json:"reason"`
	Delayed         bool     `json:"delayed"`
}

type result struct {
	UserTranscripts []string `json:"user_transcripts"`
	BotTexts        []string `json:"bot_texts"`
	Turns           []*turn  `json:"turns"`
	AudioSeconds    float64  `json:"audio_seconds"`
	SessionID       string   `json:"session_id"`
}

func mulaw(b byte) float64 {
	u := ^b
	t := (int(u&0x0f)<<3 + 0x84) << ((u & 0x70) >> 4)
	if u&0x80 != 0 {
		return float64(0x84 - t)
	}
	return float64(t - 0x84)
}

// segment ends (in frames) of speech: 20 ms windows louder than a threshold, short gaps merged.
func speechEnds(data []byte, f *pb.AudioFormat) []int {
	channels := int(f.GetChannels())
	if channels == 0 {
		channels = 1
	}
	isMulaw := f.GetEncoding() == pb.AudioEncoding_AUDIO_ENCODING_MULAW
	width := 2
	if isMulaw {
		width = 1
	}
	frames := len(data) / (channels * width)
	sample := func(i int) float64 {
		sum := 0.0
		for c := 0; c < channels; c++ {
			k := i*channels + c
			if isMulaw {
				sum += mulaw(data[k])
			} else {
				sum += float64(int16(binary.LittleEndian.Uint16(data[2*k:])))
			}
		}
		return sum / float64(channels)
	}
	win := int(f.GetSampleRateHz()) / 50
	var rms []float64
	peak := 0.0
	for s := 0; s < frames; s += win {
		e, acc := s+win, 0.0
		if e > frames {
			e = frames
		}
		for i := s; i < e; i++ {
			v := sample(i)
			acc += v * v
		}
		r := math.Sqrt(acc / float64(e-s))
		rms = append(rms, r)
		peak = math.Max(peak, r)
	}
	threshold := math.Max(300, 0.1*peak)
	type seg struct{ a, b int }
	var segs []seg
	for i, r := range rms {
		if r < threshold {
			continue
		}
		if n := len(segs); n > 0 && i-segs[n-1].b <= 15 {
			segs[n-1].b = i + 1
		} else {
			segs = append(segs, seg{i, i + 1})
		}
	}
	var ends []int
	for _, s := range segs {
		if s.b-s.a >= 5 {
			end := s.b * win
			if end > frames {
				end = frames
			}
			ends = append(ends, end)
		}
	}
	return ends
}

func main() {
	addr := flag.String("addr", voicemesh.DefaultAddr(), "orchestrator host:port")
	out := flag.String("out", "", "write the reply audio to this WAV")
	asJSON := flag.Bool("json", false, "print one JSON object")
	prompt := flag.String("system-prompt", "", "system prompt")
	voice := flag.String("voice", "", "TTS voice")
	apiKey := flag.String("api-key", "", "API key, sent as a bearer token (default $VOICEMESH_API_KEY)")
	flag.StringVar(apiKey, "token", "", "the same as -api-key")
	useTLS := flag.Bool("tls", false, "connect with TLS, the system's roots")
	var files voicemesh.TLSFiles
	flag.StringVar(&files.CAFile, "ca-file", "", "TLS with this CA (default $VOICEMESH_CLIENT_TLS_CA_FILE)")
	flag.StringVar(&files.CertFile, "cert-file", "", "client certificate, for mTLS (with -key-file)")
	flag.StringVar(&files.KeyFile, "key-file", "", "client key, for mTLS")
	flag.StringVar(&files.ServerName, "server-name", "", "check the server's certificate against this name")
	waitAfter := flag.Duration("wait-after", 20*time.Second, "give up this long after the last event")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: talk [flags] IN.wav")
		flag.PrintDefaults()
		os.Exit(2)
	}
	var opts []voicemesh.Option
	if *apiKey != "" {
		opts = append(opts, voicemesh.WithAPIKey(*apiKey))
	}
	if files != (voicemesh.TLSFiles{}) {
		opts = append(opts, voicemesh.WithTLSFiles(files))
	} else if *useTLS {
		opts = append(opts, voicemesh.WithTLS(&tls.Config{}))
	}
	if err := run(*addr, flag.Arg(0), *out, *asJSON, *prompt, *voice, opts, *waitAfter); err != nil {
		fmt.Fprintln(os.Stderr, "talk:", err)
		os.Exit(1)
	}
}

func run(addr, in, out string, asJSON bool, prompt, voice string, opts []voicemesh.Option, waitAfter time.Duration) error {
	raw, err := os.ReadFile(in)
	if err != nil {
		return err
	}
	format, data, err := voicemesh.DecodeWAV(raw)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	client, err := voicemesh.Dial(ctx, addr, opts...)
	if err != nil {
		return err
	}
	defer client.Close()
	session, err := client.Start(ctx, &pb.SessionConfig{SystemPrompt: prompt, Voice: voice, InputFormat: format,
		Metadata: map[string]string{"client": "voicemesh-go-talk"}})
	if err != nil {
		return err
	}
	defer session.Close()

	var mu sync.Mutex
	turns := map[uint32]*turn{}
	get := func(n uint32) *turn {
		if turns[n] == nil {
			turns[n] = &turn{Number: n}
		}
		return turns[n]
	}
	open := map[uint32]bool{}
	speaking := 0
	var lastTurnEnd, lastEvent time.Time
	lastEvent = time.Now()
	firstAudio := map[uint32]time.Time{}
	var transcripts []string
	var audio []byte
	endReason := ""
	fatal := false
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		for ev := range session.Events() {
			mu.Lock()
			now := time.Now()
			lastEvent = now
			switch e := ev.GetEvent().(type) {
			case *pb.ConverseResponse_Audio:
				if _, ok := firstAudio[e.Audio.GetTurnNumber()]; !ok {
					firstAudio[e.Audio.GetTurnNumber()] = now
				}
				audio = append(audio, e.Audio.GetChunk().GetData()...)
			case *pb.ConverseResponse_UserTranscript:
				if text := strings.TrimSpace(e.UserTranscript.GetText()); e.UserTranscript.GetIsFinal() && text != "" {
					t := get(e.UserTranscript.GetTurnNumber())
					t.UserTranscript = strings.TrimSpace(t.UserTranscript + " " + text)
					transcripts = append(transcripts, text)
				}
			case *pb.ConverseResponse_BotText:
				if text := strings.TrimSpace(e.BotText.GetText()); text != "" {
					t := get(e.BotText.GetTurnNumber())
					t.BotText = strings.TrimSpace(t.BotText + " " + text)
				}
			case *pb.ConverseResponse_Speaking:
				switch e.Speaking.GetKind() {
				case pb.SpeakingEvent_KIND_USER_STARTED:
					speaking++
				case pb.SpeakingEvent_KIND_USER_STOPPED:
					if speaking > 0 {
						speaking--
					}
				}
			case *pb.ConverseResponse_TurnStarted:
				get(e.TurnStarted.GetTurnNumber())
				open[e.TurnStarted.GetTurnNumber()] = true
			case *pb.ConverseResponse_TurnEnded:
				t := get(e.TurnEnded.GetTurnNumber())
				t.Interrupted = e.TurnEnded.GetInterrupted()
				t.Reason = strings.TrimPrefix(e.TurnEnded.GetReason().String(), "REASON_")
				if l := e.TurnEnded.GetLatencyMs(); l > 0 {
					t.ServerLatencyMs = &l
				}
				delete(open, e.TurnEnded.GetTurnNumber())
				lastTurnEnd = now
			case *pb.ConverseResponse_TurnDelayed:
				get(e.TurnDelayed.GetTurnNumber()).Delayed = true
			case *pb.ConverseResponse_Error:
				fatal = fatal || e.Error.GetFatal()
				if !asJSON {
					fmt.Fprintf(os.Stderr, "error from %s: %s: %s\n", e.Error.GetSource(), e.Error.GetCode(), e.Error.GetMessage())
				}
			case *pb.ConverseResponse_SessionEnded:
				endReason = strings.TrimPrefix(e.SessionEnded.GetReason().String(), "REASON_")
			}
			mu.Unlock()
		}
	}()

	// The input in real time, then silence until the last utterance is answered.
	frameBytes := voicemesh.BytesPerSecond(format) / int(format.GetSampleRateHz())
	chunkFrames := int(format.GetSampleRateHz()) * chunkMs / 1000
	chunkBytes := chunkFrames * frameBytes
	fill := byte(0)
	if format.GetEncoding() == pb.AudioEncoding_AUDIO_ENCODING_MULAW {
		fill = 0xff
	}
	ends := speechEnds(data, format)
	var sentAt []time.Time
	begin := time.Now()
	var audioDone, lastSpeechEnd time.Time
	for i := 0; ; i++ {
		chunk := make([]byte, chunkBytes)
		for k := range chunk {
			chunk[k] = fill
		}
		if i*chunkBytes < len(data) {
			copy(chunk, data[i*chunkBytes:])
		} else {
			if audioDone.IsZero() {
				audioDone = time.Now()
				if n := len(ends); n > 0 {
					if k := (ends[n-1] - 1) / chunkFrames; k < len(sentAt) {
						lastSpeechEnd = sentAt[k]
					}
				}
			}
			mu.Lock()
			answered := len(open) == 0 && speaking == 0 && (lastSpeechEnd.IsZero() || !lastTurnEnd.Before(lastSpeechEnd))
			idleSince := lastEvent
			mu.Unlock()
			if idleSince.Before(audioDone) {
				idleSince = audioDone
			}
			if answered || time.Since(idleSince) >= waitAfter {
				break
			}
		}
		time.Sleep(time.Until(begin.Add(time.Duration(i) * chunkMs * time.Millisecond))) // real-time pacing
		if session.SendAudio(chunk) != nil {
			break
		}
		sentAt = append(sentAt, time.Now())
	}
	if err := session.End(); err != nil {
		return err
	}
	<-readerDone
	if err := session.Err(); err != nil {
		return err
	}

	// Each speech segment's end, matched to the first reply audio that follows it.
	var endTimes []time.Time
	for _, e := range ends {
		if k := (e - 1) / chunkFrames; k < len(sentAt) {
			endTimes = append(endTimes, sentAt[k])
		}
	}
	type first struct {
		n  uint32
		at time.Time
	}
	var firsts []first
	for n, at := range firstAudio {
		firsts = append(firsts, first{n, at})
	}
	sort.Slice(firsts, func(i, j int) bool { return firsts[i].at.Before(firsts[j].at) })
	e := 0
	for _, f := range firsts {
		var latest time.Time
		for e < len(endTimes) && !endTimes[e].After(f.at) {
			latest = endTimes[e]
			e++
		}
		if !latest.IsZero() {
			ms := math.Round(float64(f.at.Sub(latest).Microseconds())/100) / 10
			get(f.n).LatencyMs = &ms
		}
	}

	res := result{UserTranscripts: transcripts, SessionID: session.ID(), Turns: []*turn{}, BotTexts: []string{}}
	for _, t := range turns {
		res.Turns = append(res.Turns, t)
	}
	sort.Slice(res.Turns, func(i, j int) bool { return res.Turns[i].Number < res.Turns[j].Number })
	for _, t := range res.Turns {
		if t.BotText != "" {
			res.BotTexts = append(res.BotTexts, t.BotText)
		}
	}
	outFormat := session.OutputFormat()
	res.AudioSeconds = math.Round(float64(len(audio))/float64(voicemesh.BytesPerSecond(outFormat))*1000) / 1000
	if out != "" {
		if err := os.WriteFile(out, voicemesh.EncodeWAV(audio, outFormat), 0o644); err != nil {
			return err
		}
	}
	if asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(res); err != nil {
			return err
		}
	} else {
		for _, t := range res.Turns {
			latency := "no latency"
			if t.LatencyMs != nil {
				latency = fmt.Sprintf("%.1f ms", *t.LatencyMs)
			}
			fmt.Printf("turn %d: you: %s\n        bot: %s  (%s, %s)\n", t.Number, t.UserTranscript, t.BotText, latency, t.Reason)
		}
		if out != "" {
			fmt.Printf("reply audio: %s (%.3f s)\n", out, res.AudioSeconds)
		}
	}
	if endReason == "ERROR" || fatal {
		return fmt.Errorf("the session ended with an error")
	}
	return nil
}
