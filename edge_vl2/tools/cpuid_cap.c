/* Make this process see an AVX2-only x86-64 CPU: a benchmark aid, never part of a device install.
 *
 * Loaded with LD_PRELOAD (edge_vl2/tools/cpu_isa.py builds and sets it). Its constructor asks the kernel to make
 * the CPUID instruction fault in this process (arch_prctl ARCH_SET_CPUID, Linux >= 4.12 on CPUs with the
 * `cpuid_fault` flag); the SIGSEGV handler then runs the real CPUID and clears the feature bits of AVX-512, VNNI
 * (AVX-512 and VEX forms), AMX and the other post-AVX2 vector extensions before returning to the caller. Libraries
 * that choose kernels from CPUID (ONNX Runtime's MLAS, oneDNN, PyTorch's dispatcher, FBGEMM) then take their AVX2
 * paths, as on a kiosk PC. The setting is per thread, inherited by threads and forks, and reset by exec, where the
 * preload applies it again. Faults that are not a CPUID get the default action (the process dies as it would).
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static int active;

static long set_cpuid_enabled(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on); }

/* Feature bits above AVX2 (Intel SDM vol. 2A, CPUID leaf 07H). */
static void mask_leaf7(uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d) {
    if (sub == 0) {
        /* EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
        *b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31));
        /* ECX: AVX512_VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
        *c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX_BF16 22, AVX512_FP16 23, AMX_TILE 24, AMX_INT8 25 */
        *d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (sub == 1) {
        /* EAX: AVX_VNNI 4, AVX512_BF16 5, AMX_FP16 21, AVX_IFMA 23; EDX: AVX_VNNI_INT8 4, AVX_NE_CONVERT 5,
           AVX_VNNI_INT16 10, AVX10 19 */
        *a &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));
        *d &= ~((1u << 4) | (1u << 5) | (1u << 10) | (1u << 19));
    }
}

static void on_fault(int sig, siginfo_t *info, void *context) {
    (void)info;
    ucontext_t *uc = context;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* not CPUID: a real fault */
        signal(sig, SIG_DFL);
        return; /* the instruction runs again and faults with the default action */
    }
    uint32_t leaf = (uint32_t)r[REG_RAX], sub = (uint32_t)r[REG_RCX], a, b, c, d;
    set_cpuid_enabled(1);
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(sub));
    set_cpuid_enabled(0);
    if (leaf == 7) mask_leaf7(sub, &a, &b, &c, &d);
    r[REG_RAX] = a;
    r[REG_RBX] = b;
    r[REG_RCX] = c;
    r[REG_RDX] = d;
    r[REG_RIP] += 2; /* past the two-byte CPUID */
}

__attribute__((constructor)) static void cap_at_avx2(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    if (sigaction(SIGSEGV, &sa, 0) == 0 && set_cpuid_enabled(0) == 0) active = 1;
}

/* 1 when CPUID is being masked in this process (cpu_isa.py checks it through ctypes). */
int edge_vl2_cpuid_cap_active(void) { return active; }
