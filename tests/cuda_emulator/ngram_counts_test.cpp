// The CUDA n-gram counting kernels (csrc/cuda/ngram_counts.cu) run in the block emulator of
// emu.h and compared with a plain loop: counts (added to a non-zero table) and the reported bad
// position, for uint8 / int16 / int32 / int64 tokens and n = 1, 2, 3, over shapes chosen to reach
// every code path: rows shorter than n, rows shorter than a 16-byte vector, row ends inside a
// vector and inside a halo, every misalignment of the data pointer, ignore_index in and out of
// [0, V) and out of the dtype's range, bad tokens, inputs long enough for several blocks and
// grid-stride steps, a table with more than 2^32 bins. Each case runs on three emulated devices:
// the shared-memory kernel, a device with too little shared memory (the global-atomic kernel),
// and one with 2 SMs (few blocks: every thread loops). Tokens end at a page boundary followed by
// an inaccessible page, so a read past the array faults. Built and run by `make cuda-emulate`;
// a case name as argument runs the cases containing it.
#include "emu.h"
#include "emu_test.h"
#include "launchers.h"

#include <sys/mman.h>
#include <unistd.h>

#include <map>
#include <random>
#include <string>

using dlfast::cuda::TokenDType;

struct Case {
  std::string name;
  TokenDType dtype = TokenDType::Int32;
  int64_t rows = 3, L = 37, V = 27;
  int n = 2;
  bool has_ignore = false;
  int64_t ignore = 0;
  int offset = 0;        // elements between a 16-byte boundary and the first token
  int bad_every = 0;     // every bad_every-th token (about) is out of range; 0: none
  int ignore_every = 0;  // every ignore_every-th token (about) is ignore_index; 0: none
  uint64_t value_base = 0;  // tokens are drawn from [value_base, value_base + span)
  uint64_t span = 0;        // 0: V
};

size_t elem_bytes(TokenDType t) {
  switch (t) {
    case TokenDType::UInt8: return 1;
    case TokenDType::Int16: return 2;
    case TokenDType::Int32: return 4;
    default: return 8;
  }
}

void store(void* p, int64_t i, int64_t v, TokenDType t) {
  switch (t) {
    case TokenDType::UInt8: static_cast<uint8_t*>(p)[i] = uint8_t(v); break;
    case TokenDType::Int16: static_cast<int16_t*>(p)[i] = int16_t(v); break;
    case TokenDType::Int32: static_cast<int32_t*>(p)[i] = int32_t(v); break;
    default: static_cast<int64_t*>(p)[i] = v; break;
  }
}

// Tokens starting `offset` bytes past a 16-byte boundary and ending in the last 16 bytes of a page
// (exactly at its end for one offset of each shape), the next page inaccessible: a read past
// the array's last 16-byte granule faults.
struct GuardedTokens {
  char* map = nullptr;
  size_t map_bytes = 0;
  char* ptr = nullptr;
  GuardedTokens(size_t bytes, size_t offset) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t data_pages = (bytes + 16 + page - 1) / page + 1;
    map_bytes = (data_pages + 1) * page;
    map = static_cast<char*>(mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (map == MAP_FAILED) EMU_FAIL("mmap");
    mprotect(map + data_pages * page, page, PROT_NONE);
    const size_t gap = (16 - (bytes + offset) % 16) % 16;
    ptr = map + data_pages * page - bytes - gap;
  }
  ~GuardedTokens() { munmap(map, map_bytes); }
};

// The table, sparse when it is too large to allocate (the > 2^32-bin case): a reserved but
// untouched mapping registered as one buffer.
struct Table {
  int64_t* data = nullptr;
  size_t bytes = 0;
  explicit Table(int64_t bins) : bytes(size_t(bins) * 8) {
    data = static_cast<int64_t*>(mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (data == MAP_FAILED) EMU_FAIL("mmap of the table");
    emu::g_buffers.push_back({reinterpret_cast<const char*>(data), bytes});
  }
  ~Table() {
    for (auto it = emu::g_buffers.begin(); it != emu::g_buffers.end(); ++it)
      if (it->first == reinterpret_cast<const char*>(data)) { emu::g_buffers.erase(it); break; }
    munmap(data, bytes);
  }
};

void run(const Case& c, int device) {
  g_device = device;
  const int64_t total = c.rows * c.L;
  const size_t eb = elem_bytes(c.dtype);
  GuardedTokens mem(size_t(total) * eb, c.offset * eb);
  char* base = mem.ptr;
  if ((reinterpret_cast<uintptr_t>(base) % 16) != c.offset * eb) EMU_FAIL("offset setup");

  std::mt19937_64 rng(1234 + total * 7 + c.n + device);
  std::vector<int64_t> tok(total);
  for (int64_t i = 0; i < total; ++i) {
    int64_t v = int64_t(c.value_base + rng() % (c.span ? c.span : uint64_t(c.V)));
    if (c.bad_every && rng() % c.bad_every == 0) {
      const bool can_negative = c.dtype != TokenDType::UInt8;
      v = can_negative && rng() % 2 ? -1 - int64_t(rng() % 3) : c.V + int64_t(rng() % 3);
      if (c.dtype == TokenDType::UInt8 && v > 255) v = 255;
    }
    if (c.ignore_every && rng() % c.ignore_every == 0) v = c.ignore;
    store(base, i, v, c.dtype);
    // What the kernel sees: the value as stored.
    switch (c.dtype) {
      case TokenDType::UInt8: tok[i] = static_cast<uint8_t*>(static_cast<void*>(base))[i]; break;
      case TokenDType::Int16: tok[i] = reinterpret_cast<int16_t*>(base)[i]; break;
      case TokenDType::Int32: tok[i] = reinterpret_cast<int32_t*>(base)[i]; break;
      default: tok[i] = reinterpret_cast<int64_t*>(base)[i]; break;
    }
  }

  int64_t bins = 1;
  for (int k = 0; k < c.n; ++k) bins *= c.V;
  const bool sparse = bins > (int64_t(1) << 26);
  Table table(bins);
  std::map<int64_t, int64_t> ref;  // bin -> expected count, for the bins touched or seeded
  // Seed a non-zero table: counting adds to it.
  for (int k = 0; k < 64; ++k) {
    const int64_t b = int64_t(rng() % uint64_t(bins));
    ref[b] = table.data[b] = int64_t(rng() % 1000) - 500;
  }
  if (!sparse) {
    for (int64_t b = 0; b < bins; ++b) if (!ref.count(b)) table.data[b] = 0;
  }

  const auto ok = [&](int64_t t) { return t >= 0 && t < c.V && !(c.has_ignore && t == c.ignore); };
  int64_t expect_bad = -1;
  for (int64_t i = 0; i < total; ++i) {
    const int64_t t = tok[i];
    if ((t < 0 || t >= c.V) && !(c.has_ignore && t == c.ignore) && expect_bad < 0) expect_bad = i;
    if (i % c.L + c.n > c.L) continue;
    int64_t b = 0;
    bool keep = true;
    for (int k = 0; k < c.n; ++k) {
      keep = keep && ok(tok[i + k]);
      b = b * c.V + tok[i + k];
    }
    if (keep) ++ref[b];
  }

  Buf bad(8);
  const cudaError_t err = dlfast::cuda::ngram_counts(base, c.dtype, c.rows, c.L, c.V, c.n, c.has_ignore, c.ignore,
                                                     table.data, static_cast<int64_t*>(bad.ptr()), nullptr);
  const std::string where = c.name + " (device " + std::to_string(device) + ")";
  if (err != cudaSuccess) {
    printf("  FAIL %s: launcher returned %d\n", where.c_str(), int(err));
    ++failures;
    return;
  }
  const int64_t got_bad = *static_cast<int64_t*>(bad.ptr());
  if (got_bad != expect_bad) {
    printf("  FAIL %s: bad position %lld, expected %lld\n", where.c_str(), (long long)got_bad, (long long)expect_bad);
    ++failures;
  }
  if (!bad.guards_ok()) { printf("  FAIL %s: write next to the bad position\n", where.c_str()); ++failures; }
  int wrong = 0;
  if (sparse) {
    for (const auto& [b, v] : ref) if (table.data[b] != v && wrong++ < 3)
      printf("  FAIL %s: bin %lld = %lld, expected %lld\n", where.c_str(), (long long)b, (long long)table.data[b], (long long)v);
  } else {
    for (int64_t b = 0; b < bins; ++b) {
      const auto it = ref.find(b);
      const int64_t want = it == ref.end() ? 0 : it->second;
      if (table.data[b] != want && wrong++ < 3)
        printf("  FAIL %s: bin %lld = %lld, expected %lld\n", where.c_str(), (long long)b, (long long)table.data[b], (long long)want);
    }
  }
  if (wrong) ++failures;
}

void run_invalid() {
  Buf tokens(64), counts(64 * 8), bad(8);
  const auto call = [&](int64_t rows, int64_t L, int64_t V, int n) {
    return dlfast::cuda::ngram_counts(tokens.ptr(), TokenDType::UInt8, rows, L, V, n, false, 0,
                                      static_cast<int64_t*>(counts.ptr()), static_cast<int64_t*>(bad.ptr()), nullptr);
  };
  const struct { int64_t rows, L, V; int n; const char* what; } cases[] = {
      {1, 4, 4, 0, "n = 0"}, {1, 4, 4, 4, "n = 4"}, {1, 4, 0, 2, "V = 0"},
      {-1, 4, 4, 2, "rows < 0"}, {1, -4, 4, 2, "L < 0"}, {1, 4, int64_t(1) << 22, 3, "V^3 past int64"},
  };
  for (const auto& c : cases) {
    if (call(c.rows, c.L, c.V, c.n) != cudaErrorInvalidValue) {
      printf("  FAIL invalid: %s was accepted\n", c.what);
      ++failures;
    }
  }
  // No tokens: only the bad position is written, -1.
  memset(bad.ptr(), 0, 8);
  if (call(0, 5, 4, 2) != cudaSuccess || *static_cast<int64_t*>(bad.ptr()) != -1) {
    printf("  FAIL invalid: rows = 0 did not give -1\n");
    ++failures;
  }
}

int main(int argc, char** argv) {
  std::vector<Case> cases;
  const auto add = [&](Case c, const std::string& name) { c.name = name; cases.push_back(c); };
  const struct { TokenDType t; const char* tag; } dtypes[] = {
      {TokenDType::UInt8, "u8"}, {TokenDType::Int16, "i16"}, {TokenDType::Int32, "i32"}, {TokenDType::Int64, "i64"}};
  for (const auto& d : dtypes) {
    const int lanes = int(16 / elem_bytes(d.t));
    for (int n = 1; n <= 3; ++n) {
      const std::string s = std::string(d.tag) + "_n" + std::to_string(n);
      // Every misalignment, rows ending anywhere inside vectors and halos.
      for (int off = 0; off < lanes; ++off) {
        Case c; c.dtype = d.t; c.n = n; c.offset = off; c.rows = 3; c.L = 37;
        add(c, s + "_3x37_off" + std::to_string(off));
      }
      { Case c; c.dtype = d.t; c.n = n; c.rows = 5; c.L = n - 1 > 0 ? n - 1 : 1; c.offset = 1 % lanes; add(c, s + "_L_below_n"); }
      { Case c; c.dtype = d.t; c.n = n; c.rows = 11; c.L = 3; add(c, s + "_11x3_rows_inside_vectors"); }
      { Case c; c.dtype = d.t; c.n = n; c.rows = 1; c.L = 1; add(c, s + "_1x1"); }
      { Case c; c.dtype = d.t; c.n = n; c.rows = 1; c.L = lanes + n - 1; c.offset = lanes - 1; add(c, s + "_one_vector_and_halo"); }
      // ignore_index inside [0, V), bad tokens, several blocks and grid steps.
      { Case c; c.dtype = d.t; c.n = n; c.rows = 3; c.L = 20011; c.offset = lanes / 2; c.has_ignore = true; c.ignore = 5; c.ignore_every = 7; add(c, s + "_3x20011_ignore5"); }
      { Case c; c.dtype = d.t; c.n = n; c.rows = 2; c.L = 3001; c.bad_every = 500; c.has_ignore = true; c.ignore = d.t == TokenDType::UInt8 ? 200 : -100; c.ignore_every = 9; add(c, s + "_bad_and_ignore_outside_V"); }
      // Larger vocabularies: the uint8 bigram table (65536 bins) is past the emulated H100's
      // shared memory, so it takes the global kernel on every device.
      if (n <= 2) { Case c; c.dtype = d.t; c.n = n; c.rows = 4; c.L = 999; c.V = d.t == TokenDType::UInt8 ? 256 : 300; c.offset = 1 % lanes; add(c, s + "_large_V"); }
    }
  }
  { Case c; c.dtype = TokenDType::Int16; c.has_ignore = true; c.ignore = 70000; c.bad_every = 50; add(c, "i16_ignore_outside_int16"); }
  { Case c; c.dtype = TokenDType::Int32; c.has_ignore = true; c.ignore = -(int64_t(1) << 40); c.bad_every = 50; add(c, "i32_ignore_outside_int32"); }
  { Case c; c.dtype = TokenDType::Int32; c.V = int64_t(1) << 31; c.n = 1; c.rows = 2; c.L = 100; c.bad_every = 10; c.value_base = (uint64_t(1) << 31) - 27; c.span = 27; add(c, "i32_V_2p31"); }
  // V past 2^31 with int32 tokens: the values drawn past 2^31 - 1 wrap to INT32_MIN... and must
  // be reported, not read as unsigned indices below V.
  { Case c; c.dtype = TokenDType::Int32; c.V = (int64_t(1) << 31) + 5; c.n = 1; c.rows = 2; c.L = 100; c.value_base = (uint64_t(1) << 31) - 20; c.span = 40; add(c, "i32_V_past_2p31"); }
  { Case c; c.dtype = TokenDType::Int64; c.V = (int64_t(1) << 32) + 9; c.n = 1; c.rows = 2; c.L = 301; c.value_base = (uint64_t(1) << 32) - 20; c.span = 29; add(c, "i64_over_2p32_bins"); }
  // Shared-memory tables past 48 KiB, a larger one again after a smaller one (the opt-in must
  // still cover it).
  for (int64_t V : {150, 120, 150}) { Case c; c.dtype = TokenDType::Int16; c.V = V; c.rows = 3; c.L = 5000; add(c, "i16_n2_V" + std::to_string(V) + "_smem_past_48k"); }
  { Case c; c.dtype = TokenDType::UInt8; c.n = 2; c.rows = 1; c.L = 300007; c.V = 27; c.offset = 5; c.bad_every = 100000; add(c, "u8_n2_long_row_many_blocks"); }

  return run_cases(
      argc, argv, cases,
      [](const Case& c) {
        for (int device = 0; device < 3; ++device) run(c, device);
      },
      run_invalid);
}
