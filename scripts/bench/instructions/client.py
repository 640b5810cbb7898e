# A fixed client for instructions.sh: N sequential requests, one connection (ka) or one
# connection each with `Connection: close` (close); checks every answer is a 200.
import socket, sys
mode, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
req_ka = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
req_close = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
def read_resp(s, buf):
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d: raise SystemExit("eof")
        buf += d
    head, rest = buf.split(b"\r\n\r\n", 1)
    cl = 0
    for line in head.split(b"\r\n")[1:]:
        k, v = line.split(b":", 1)
        if k.lower() == b"content-length": cl = int(v)
    while len(rest) < cl:
        rest += s.recv(65536)
    assert head.startswith(b"HTTP/1.1 200"), head
    return rest[cl:]
if mode == "ka":
    s = socket.create_connection(("127.0.0.1", port))
    buf = b""
    for _ in range(n):
        s.sendall(req_ka)
        buf = read_resp(s, buf)
    s.close()
else:
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(req_close)
        read_resp(s, b"")
        while s.recv(65536): pass
        s.close()
