"""The HTTP/JSON API of Conveyor (JobService and JobEvents, Server-Sent Events)."""
