// Command vcsim starts the vCenter simulator from Debian's govmomi package
// (golang-github-vmware-govmomi-dev) with a chosen inventory on a fixed
// loopback address, for the vsphere-client tests and benchmarks.
//
// It prints one line, "VCSIM_URL <url>", once the server accepts requests,
// and runs until SIGTERM or SIGINT, when it removes the datastore folders it
// made. Build (GOPATH mode, no modules):
//
//	GOPATH=/usr/share/gocode GO111MODULE=off go build -o vcsim ./integration/vcsim
package main

import (
	"crypto/tls"
	"encoding/pem"
	"flag"
	"fmt"
	"io/ioutil"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on (loopback)")
	useTLS := flag.Bool("tls", true, "serve HTTPS with a self-signed certificate")
	certOut := flag.String("cert-out", "", "write the server certificate (PEM) to this file")
	certIn := flag.String("cert", "", "serve this certificate (PEM) instead of a self-signed one")
	keyIn := flag.String("key", "", "the private key (PEM) of -cert")
	user := flag.String("user", "", "accept only this user:password (any non-empty password when unset)")
	dc := flag.Int("dc", 1, "datacenters")
	clusters := flag.Int("cluster", 1, "clusters per datacenter")
	hosts := flag.Int("host", 3, "hosts per cluster")
	standalone := flag.Int("standalone-host", 1, "standalone hosts per datacenter")
	ds := flag.Int("ds", 1, "datastores (each mounted on every host)")
	vms := flag.Int("vm", 2, "VMs per resource pool")
	pg := flag.Int("pg", 1, "distributed port groups per datacenter")
	delay := flag.Int("delay", 0, "milliseconds each SOAP call waits before it is served (a distant vCenter)")
	flag.Parse()

	m := simulator.VPX()
	m.Datacenter = *dc
	m.Cluster = *clusters
	m.ClusterHost = *hosts
	m.Host = *standalone
	m.Datastore = *ds
	m.Machine = *vms
	m.Portgroup = *pg
	m.DelayConfig.Delay = *delay

	if err := m.Create(); err != nil {
		log.Fatalf("vcsim: creating the model: %v", err)
	}

	u := &url.URL{Host: *listen}
	if *user != "" {
		u.User = url.UserPassword(splitUser(*user))
	}
	m.Service.Listen = u
	if *useTLS {
		m.Service.TLS = new(tls.Config)
		if *certIn != "" {
			pair, err := tls.LoadX509KeyPair(*certIn, *keyIn)
			if err != nil {
				log.Fatalf("vcsim: loading -cert/-key: %v", err)
			}
			m.Service.TLS.Certificates = []tls.Certificate{pair}
		}
	}
	s := m.Service.NewServer()

	if *useTLS && *certOut != "" {
		block := &pem.Block{Type: "CERTIFICATE", Bytes: s.Certificate().Raw}
		if err := ioutil.WriteFile(*certOut, pem.EncodeToMemory(block), 0o644); err != nil {
			log.Fatalf("vcsim: writing %s: %v", *certOut, err)
		}
	}

	served := *s.URL
	served.User = nil
	fmt.Printf("VCSIM_URL %s\n", served.String())
	os.Stdout.Sync()

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	s.Close()
	m.Remove()
}

func splitUser(s string) (string, string) {
	for i := 0; i < len(s); i++ {
		if s[i] == ':' {
			return s[:i], s[i+1:]
		}
	}
	return s, ""
}
