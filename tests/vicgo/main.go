// vicgo: a port layer's side of VIC's attach, with golang.org/x/crypto/ssh -- the library
// the reference's port layer uses -- restricted to the algorithms of the copy it vendors
// (host key ssh-rsa only). Used by tests/test_vic_attach_go.py against the real agent.
//
//	vicgo SOCKET SESSION_ID
//
// It syncs with the HEAD handshake, then prints one JSON object of what it saw.
package main

import (
	"bufio"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"golang.org/x/crypto/ssh"
)

const (
	syn = 0x16
	ack = 0x06
)

type result struct {
	IDs          []string `json:"ids"`
	Version      uint32   `json:"version"`
	UnknownOK    bool     `json:"unknown_ok"`
	UnknownText  string   `json:"unknown_text"`
	Echo         string   `json:"echo"`
	Rest         string   `json:"rest"`
	PingOK       bool     `json:"ping_ok"`
	UnblockOK    bool     `json:"unblock_ok"`
	CloseStdinOK bool     `json:"close_stdin_ok"`
	RefusedCode  int      `json:"refused_code"`
	RefusedText  string   `json:"refused_text"`
	HostKeyType  string   `json:"host_key_type"`
}

// handshake: the HEAD protocol, one attempt per second until it holds.
func handshake(conn net.Conn) error {
	buf := make([]byte, 32*1024)
	for attempt := 0; attempt < 30; attempt++ {
		pos := make([]byte, 1)
		rand.Read(pos)
		p := pos[0] % 255
		if _, err := conn.Write([]byte{syn, p}); err != nil {
			return err
		}
		conn.SetReadDeadline(time.Now().Add(time.Second))
		n, err := io.ReadAtLeast(conn, buf, 3)
		if err != nil {
			continue
		}
		got := buf[n-3 : n]
		if got[0] != ack || got[1] != p+1 {
			continue
		}
		if _, err := conn.Write([]byte{ack, got[2] + 1}); err != nil {
			return err
		}
		last := buf[:1]
		if _, err := conn.Read(last); err != nil || last[0] != ack {
			continue
		}
		conn.SetReadDeadline(time.Time{})
		return nil
	}
	return fmt.Errorf("no handshake")
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "vicgo: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 3 {
		fail("usage: vicgo SOCKET SESSION_ID")
	}
	conn, err := net.Dial("unix", os.Args[1])
	if err != nil {
		fail("dial: %s", err)
	}
	if err := handshake(conn); err != nil {
		fail("%s", err)
	}
	var out result
	config := &ssh.ClientConfig{
		User: "daemon",
		HostKeyCallback: func(hostname string, remote net.Addr, key ssh.PublicKey) error {
			out.HostKeyType = key.Type()
			return nil
		},
		ClientVersion:     "SSH-2.0-VIC",
		HostKeyAlgorithms: []string{ssh.KeyAlgoRSA},
		Timeout:           10 * time.Second,
	}
	config.KeyExchanges = []string{"curve25519-sha256@libssh.org", "ecdh-sha2-nistp256",
		"ecdh-sha2-nistp384", "ecdh-sha2-nistp521", "diffie-hellman-group14-sha1"}
	config.Ciphers = []string{"aes128-ctr", "aes192-ctr", "aes256-ctr", "aes128-gcm@openssh.com"}
	config.MACs = []string{"hmac-sha2-256-etm@openssh.com", "hmac-sha2-256", "hmac-sha1"}
	client, chans, reqs, err := ssh.NewClientConn(conn, "", config)
	if err != nil {
		fail("ssh: %s", err)
	}
	go ssh.DiscardRequests(reqs)
	go func() {
		for ch := range chans {
			ch.Reject(ssh.UnknownChannelType, "no")
		}
	}()

	ok, payload, err := client.SendRequest("container-ids", true, nil)
	if err != nil || !ok {
		fail("container-ids: %v %v", ok, err)
	}
	var ids struct{ IDs []string }
	if err := ssh.Unmarshal(payload, &ids); err != nil {
		fail("container-ids payload: %s", err)
	}
	out.IDs = ids.IDs
	ok, payload, err = client.SendRequest("version", true, nil)
	if err != nil || !ok {
		fail("version: %v %v", ok, err)
	}
	var version struct{ Version uint32 }
	if err := ssh.Unmarshal(payload, &version); err != nil {
		fail("version payload: %s", err)
	}
	out.Version = version.Version
	out.UnknownOK, payload, _ = client.SendRequest("no-such-request", true, nil)
	out.UnknownText = string(payload)

	if _, _, err := client.OpenChannel("attach", []byte("no-such-session")); err != nil {
		if refused, ok := err.(*ssh.OpenChannelError); ok {
			out.RefusedCode = int(refused.Reason)
			out.RefusedText = refused.Message
		}
	}

	channel, creqs, err := client.OpenChannel("attach", []byte(os.Args[2]))
	if err != nil {
		fail("attach: %s", err)
	}
	go ssh.DiscardRequests(creqs)
	out.PingOK, _ = channel.SendRequest("ping", true, []byte("Ping"))
	out.UnblockOK, _ = channel.SendRequest("unblock", true, []byte("Unblock"))
	if _, err := channel.Write([]byte("from go \x1b[1mbold\x1b[0m\n")); err != nil {
		fail("write: %s", err)
	}
	line, err := bufio.NewReader(channel).ReadString('\n')
	if err != nil {
		fail("read: %s", err)
	}
	out.Echo = line
	channel.Write([]byte("last words\n"))
	out.CloseStdinOK, _ = channel.SendRequest("close-stdin", true, nil)
	channel.CloseWrite()
	rest, _ := io.ReadAll(channel)
	out.Rest = string(rest)
	client.Close()
	json.NewEncoder(os.Stdout).Encode(out)
}
