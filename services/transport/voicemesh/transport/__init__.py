"""The transport service: browsers (WebRTC, WebSocket) and phone media streams into Converse."""
