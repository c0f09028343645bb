// native-relay: a baseline for bench:datapath --ping-compare, NOT part of weftnet. A minimal compiled TUN <-> UDP
// relay doing the bulk link's per-packet work (ChaCha20-Poly1305 through libsodium, counter nonce, a 16-byte
// header as associated data) in one epoll loop: what the idle round trip of a data path outside the JavaScript
// event loop would be on the same machine, measured in the same run. One peer, no replay window, no handshake
// (the key comes from argv): a measuring tool, not a tunnel to use.
// build (the bench does it when cc and libsodium are there): cc -O2 native-relay.c -o native-relay -l:libsodium.so.23
// usage: native-relay TUN LOCAL_PORT PEER_IP PEER_PORT KEYHEX64 DIR(0|1)
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <errno.h>
extern int sodium_init(void);
extern int crypto_aead_chacha20poly1305_ietf_encrypt(unsigned char *c, unsigned long long *clen, const unsigned char *m, unsigned long long mlen, const unsigned char *ad, unsigned long long adlen, const unsigned char *nsec, const unsigned char *npub, const unsigned char *k);
extern int crypto_aead_chacha20poly1305_ietf_decrypt(unsigned char *m, unsigned long long *mlen, unsigned char *nsec, const unsigned char *c, unsigned long long clen, const unsigned char *ad, unsigned long long adlen, const unsigned char *npub, const unsigned char *k);
int main(int argc, char **argv) {
  if (argc < 7) { fprintf(stderr, "usage\n"); return 2; }
  if (sodium_init() < 0) return 1;
  unsigned char key[32]; for (int i = 0; i < 32; i++) sscanf(argv[5] + 2 * i, "%2hhx", &key[i]);
  int dir = atoi(argv[6]);
  int tun = open("/dev/net/tun", O_RDWR | O_NONBLOCK);
  struct ifreq ifr; memset(&ifr, 0, sizeof ifr); ifr.ifr_flags = IFF_TUN | IFF_NO_PI; strncpy(ifr.ifr_name, argv[1], IFNAMSIZ - 1);
  if (tun < 0 || ioctl(tun, TUNSETIFF, &ifr) < 0) { perror("tun"); return 1; }
  int u = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
  struct sockaddr_in la = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])) }, pa = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[4])) };
  inet_pton(AF_INET, argv[3], &pa.sin_addr);
  if (bind(u, (void *)&la, sizeof la) < 0) { perror("bind"); return 1; }
  int ep = epoll_create1(0); struct epoll_event e = { .events = EPOLLIN };
  e.data.fd = tun; epoll_ctl(ep, EPOLL_CTL_ADD, tun, &e); e.data.fd = u; epoll_ctl(ep, EPOLL_CTL_ADD, u, &e);
  static unsigned char in[65536], out[65536 + 64]; uint64_t ctr = 0; unsigned char nonce[12];
  printf("ready\n"); fflush(stdout);
  for (;;) {
    struct epoll_event ev[2]; int n = epoll_wait(ep, ev, 2, -1);
    for (int i = 0; i < n; i++) {
      if (ev[i].data.fd == tun) {
        for (;;) {
          ssize_t r = read(tun, in, sizeof in); if (r <= 0) break;
          memset(out, 0, 16); out[0] = 4; out[1] = dir; memcpy(out + 8, &ctr, 8);
          memset(nonce, 0, 12); nonce[0] = dir; memcpy(nonce + 4, &ctr, 8); ctr++;
          unsigned long long cl; crypto_aead_chacha20poly1305_ietf_encrypt(out + 16, &cl, in, r, out, 16, 0, nonce, key);
          sendto(u, out, 16 + cl, 0, (void *)&pa, sizeof pa);
        }
      } else {
        for (;;) {
          ssize_t r = recv(u, in, sizeof in, 0); if (r < 32) { if (r < 0) break; else continue; }
          memset(nonce, 0, 12); nonce[0] = in[1]; memcpy(nonce + 4, in + 8, 8);
          unsigned long long ml; if (crypto_aead_chacha20poly1305_ietf_decrypt(out, &ml, 0, in + 16, r - 16, in, 16, nonce, key) != 0) continue;
          if (write(tun, out, ml) < 0 && errno != EAGAIN) perror("tun write");
        }
      }
    }
  }
}
