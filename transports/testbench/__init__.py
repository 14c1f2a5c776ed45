"""The test bench's commands: recording, dumping, replaying and minimizing traces of device traffic."""
