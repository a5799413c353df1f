// Command vcsim serves a simulated vCenter (govmomi's simulator library) for the tests of
// `tether vsphere`. Debian packages the library (golang-github-vmware-govmomi-dev) but not
// its vcsim command, so this is the small main the tests build with Debian's Go, offline.
//
// It listens on a loopback address over HTTPS (the simulator's self-signed certificate),
// accepts only the given user name and password, prints one line "URL <url>" (with the
// credentials) when it serves, and runs until SIGTERM or SIGINT.
//
// One change to the simulator's behaviour, toward what vSphere does: ShutdownGuest asks the
// guest's tools to halt and returns; the VM powers off only when the guest does. The
// simulator's own ShutdownGuest powers the VM off at once, so a host could never meet a
// guest that ignores the request. Here the call fails with ToolsUnavailable unless the
// guest reports its tools running (a test's guest stand-in sets guest.toolsRunningStatus
// with the extraConfig key "SET.guest.toolsRunningStatus", which the simulator applies);
// otherwise it posts a VmGuestShutdownEvent, which the guest stand-in reads as the halt
// request, and leaves the power state alone. The call is answered in front of the
// simulator's SOAP handler: wrapping the VM objects instead breaks the simulator's
// reflection over them (container views, the property collector).
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"html"
	"io"
	"log"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"regexp"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

var (
	shutdownGuest = regexp.MustCompile(`<(?:\w+:)?ShutdownGuest[\s>]`)
	thisRef       = regexp.MustCompile(`<(?:\w+:)?_this[^>]*>([^<]+)</`)
)

const envelope = `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" ` +
	`xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" ` +
	`xmlns:xsd="http://www.w3.org/2001/XMLSchema" ` +
	`xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>%s</soapenv:Body></soapenv:Envelope>`

func reply(w http.ResponseWriter, status int, body string) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(status)
	fmt.Fprintf(w, envelope, body)
}

func fault(w http.ResponseWriter, kind, message, detail string) {
	reply(w, http.StatusInternalServerError, fmt.Sprintf(
		`<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>%s</faultstring>`+
			`<detail><%sFault xmlns="urn:vim25" xsi:type="%s">%s</%sFault></detail></soapenv:Fault>`,
		html.EscapeString(message), kind, kind, detail, kind))
}

// askGuestToHalt is ShutdownGuest as vSphere answers it.
func askGuestToHalt(w http.ResponseWriter, r *http.Request, body []byte, user string) {
	if _, err := r.Cookie(soap.SessionCookieName); err != nil {
		fault(w, "NotAuthenticated", "not authenticated", "")
		return
	}
	match := thisRef.FindSubmatch(body)
	if match == nil {
		fault(w, "InvalidRequest", "ShutdownGuest without _this", "")
		return
	}
	ref := types.ManagedObjectReference{Type: "VirtualMachine", Value: string(match[1])}
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		fault(w, "ManagedObjectNotFound", "managed object not found: "+ref.String(),
			fmt.Sprintf(`<obj type="VirtualMachine">%s</obj>`, html.EscapeString(ref.Value)))
		return
	}
	var power types.VirtualMachinePowerState
	var tools, name string
	simulator.Map.WithLock(vm, func() {
		power, name = vm.Runtime.PowerState, vm.Name
		if vm.Guest != nil {
			tools = vm.Guest.ToolsRunningStatus
		}
	})
	if power != types.VirtualMachinePowerStatePoweredOn {
		fault(w, "InvalidPowerState", "the VM is not powered on", fmt.Sprintf(
			`<requestedState>poweredOn</requestedState><existingState>%s</existingState>`, power))
		return
	}
	if tools != string(types.VirtualMachineToolsRunningStatusGuestToolsRunning) {
		fault(w, "ToolsUnavailable", "the guest's tools are not running", "")
		return
	}
	events := simulator.Map.EventManager()
	ctx := &simulator.Context{Context: context.Background(), Map: simulator.Map,
		Session: &simulator.Session{UserSession: types.UserSession{UserName: user}}}
	event := &types.VmGuestShutdownEvent{VmEvent: types.VmEvent{Event: types.Event{
		Vm: &types.VmEventArgument{EntityEventArgument: types.EntityEventArgument{Name: name}, Vm: ref},
	}}}
	simulator.Map.WithLock(events, func() {
		events.PostEvent(ctx, &types.PostEvent{EventToPost: event})
	})
	reply(w, http.StatusOK, `<ShutdownGuestResponse xmlns="urn:vim25"></ShutdownGuestResponse>`)
}

func withGuestHalt(next http.Handler, user string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && r.URL.Path == "/sdk" {
			body, err := io.ReadAll(r.Body)
			_ = r.Body.Close()
			if err != nil {
				w.WriteHeader(http.StatusBadRequest)
				return
			}
			if shutdownGuest.Match(body) {
				askGuestToHalt(w, r, body, user)
				return
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
		next.ServeHTTP(w, r)
	})
}

func main() {
	listen := flag.String("l", "127.0.0.1:0", "listen address")
	user := flag.String("username", "tether", "the only user name accepted")
	password := flag.String("password", "tether", "its password")
	flag.Parse()

	model := simulator.VPX()
	model.Machine = 1 // a few VMs tether did not create, so listings must filter
	if err := model.Create(); err != nil {
		log.Fatalf("vcsim: creating the model: %s", err)
	}
	defer model.Remove()

	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *password)}
	model.Service.TLS = new(tls.Config)
	server := model.Service.NewServer()
	defer server.Close()
	// No client knows the address before the URL line below, so nothing is served yet.
	server.Config.Handler = withGuestHalt(server.Config.Handler, *user)

	fmt.Printf("URL %s\n", server.URL)
	os.Stdout.Sync()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}
