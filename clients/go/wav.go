package voicemesh

import (
	"encoding/binary"
	"errors"
	"fmt"

	pb "voicemesh.dev/client/voicemeshv1"
)

// DecodeWAV parses a WAV of 16-bit PCM (format 1) or mu-law (format 7), any rate, 1 or 2
// channels: its format and sample bytes.
func DecodeWAV(b []byte) (*pb.AudioFormat, []byte, error) {
	if len(b) < 12 || string(b[0:4]) != "RIFF" || string(b[8:12]) != "WAVE" {
		return nil, nil, errors.New("not a RIFF/WAVE file")
	}
	var format *pb.AudioFormat
	for off := 12; off+8 <= len(b); {
		id, size := string(b[off:off+4]), int(binary.LittleEndian.Uint32(b[off+4:]))
		body := off + 8
		switch id {
		case "fmt ":
			if body+16 > len(b) {
				return nil, nil, errors.New("short fmt chunk")
			}
			tag, bits := binary.LittleEndian.Uint16(b[body:]), binary.LittleEndian.Uint16(b[body+14:])
			if tag == 0xfffe && size >= 26 && body+26 <= len(b) {
				tag = binary.LittleEndian.Uint16(b[body+24:])
			}
			format = &pb.AudioFormat{Channels: uint32(binary.LittleEndian.Uint16(b[body+2:])), SampleRateHz: binary.LittleEndian.Uint32(b[body+4:])}
			switch {
			case tag == 1 && bits == 16:
				format.Encoding = pb.AudioEncoding_AUDIO_ENCODING_PCM16
			case tag == 7 && bits == 8:
				format.Encoding = pb.AudioEncoding_AUDIO_ENCODING_MULAW
			default:
				return nil, nil, fmt.Errorf("unsupported WAV format %d/%d bits: use 16-bit PCM or mu-law", tag, bits)
			}
		case "data":
			if format == nil {
				return nil, nil, errors.New("WAV data before its fmt chunk")
			}
			end := body + size
			if end > len(b) {
				end = len(b)
			}
			return format, b[body:end], nil
		}
		off = body + size + size&1
	}
	return nil, nil, errors.New("WAV has no data chunk")
}

// EncodeWAV is a WAV file of data in format (PCM16 or mu-law).
func EncodeWAV(data []byte, format *pb.AudioFormat) []byte {
	channels := format.GetChannels()
	if channels == 0 {
		channels = 1
	}
	tag, width := uint16(1), uint32(2)
	if format.GetEncoding() == pb.AudioEncoding_AUDIO_ENCODING_MULAW {
		tag, width = 7, 1
	}
	h := make([]byte, 44)
	copy(h[0:], "RIFF")
	binary.LittleEndian.PutUint32(h[4:], uint32(36+len(data)))
	copy(h[8:], "WAVEfmt ")
	binary.LittleEndian.PutUint32(h[16:], 16)
	binary.LittleEndian.PutUint16(h[20:], tag)
	binary.LittleEndian.PutUint16(h[22:], uint16(channels))
	binary.LittleEndian.PutUint32(h[24:], format.GetSampleRateHz())
	binary.LittleEndian.PutUint32(h[28:], format.GetSampleRateHz()*channels*width)
	binary.LittleEndian.PutUint16(h[32:], uint16(channels*width))
	binary.LittleEndian.PutUint16(h[34:], uint16(8*width))
	copy(h[36:], "data")
	binary.LittleEndian.PutUint32(h[40:], uint32(len(data)))
	return append(h, data...)
}

// BytesPerSecond of audio in format.
func BytesPerSecond(format *pb.AudioFormat) int {
	channels, width := int(format.GetChannels()), 2
	if channels == 0 {
		channels = 1
	}
	if format.GetEncoding() == pb.AudioEncoding_AUDIO_ENCODING_MULAW {
		width = 1
	}
	return int(format.GetSampleRateHz()) * channels * width
}
