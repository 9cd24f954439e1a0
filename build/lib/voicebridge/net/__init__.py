"""The one network layer: byte transports (plain, in-memory TLS), the lean WebSocket
connection and the front door with its limits. The media socket, the assistant's
leg, the simulators and the load generator drive their sockets through it."""
