"""The jobs behind the commands, one module per command: each takes plain values, talks to the store and returns
pydantic metadata or reports; none prints or parses options (that is `loradar_cli.cli`).
"""
