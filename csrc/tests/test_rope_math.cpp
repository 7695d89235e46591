// Unit tests of the shared rotary math header, with no torch dependency.
#include <cmath>
#include <cstdint>
#include <random>

#include "check.h"
#include "rope/rope_math.h"

using omnivmed::rope::make_rope_table;
using omnivmed::rope::pair_cos_sin;
using omnivmed::rope::RopeTable;
using omnivmed::rope::rotate_pair;

static void table_follows_the_contract() {
  const int64_t sections[] = {2, 3, 0, 4};
  RopeTable<double> table;
  OMNIVMED_EXPECT(make_rope_table(sections, 4, 100.0, &table), "valid sections rejected");
  OMNIVMED_EXPECT(table.num_pairs == 9 && table.num_axes == 4, "pairs %d axes %d",
                  table.num_pairs, table.num_axes);
  const int expected_axis[] = {0, 0, 1, 1, 1, 3, 3, 3, 3};
  const double expected_freq[] = {1.0, std::pow(100.0, -0.5), 1.0, std::pow(100.0, -1.0 / 3),
                                  std::pow(100.0, -2.0 / 3), 1.0, std::pow(100.0, -0.25),
                                  std::pow(100.0, -0.5), std::pow(100.0, -0.75)};
  for (int p = 0; p < 9; ++p) {
    OMNIVMED_EXPECT(table.axis[p] == expected_axis[p], "pair %d axis %d", p, table.axis[p]);
    OMNIVMED_EXPECT(std::abs(table.inv_freq[p] - expected_freq[p]) < 1e-15, "pair %d freq %g", p,
                    table.inv_freq[p]);
  }
}

static void invalid_sections_rejected() {
  RopeTable<float> table;
  const int64_t negative[] = {4, -1};
  OMNIVMED_EXPECT(!make_rope_table(negative, 2, 1e4, &table), "negative section accepted");
  const int64_t too_many[] = {100, 29};
  OMNIVMED_EXPECT(!make_rope_table(too_many, 2, 1e4, &table), "129 pairs accepted");
  const int64_t five[] = {1, 1, 1, 1, 1};
  OMNIVMED_EXPECT(!make_rope_table(five, 5, 1e4, &table), "five axes accepted");
  const int64_t ok[] = {4};
  OMNIVMED_EXPECT(!make_rope_table(ok, 1, 0.0, &table), "theta 0 accepted");
  OMNIVMED_EXPECT(!make_rope_table(ok, 1, std::nan(""), &table), "theta NaN accepted");
}

static void rotation_matches_double_and_inverse_undoes_it() {
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> value(-3.f, 3.f);
  std::uniform_int_distribution<int> position(-100, 5000);
  double worst = 0, worst_round_trip = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    const float x1 = value(rng), x2 = value(rng);
    const float pos = static_cast<float>(position(rng));
    const float freq = std::pow(10000.f, -static_cast<float>(trial % 32) / 32.f);
    float c, s, y1, y2, ic, is, z1, z2;
    pair_cos_sin<float>(pos, freq, false, &c, &s);
    rotate_pair<float>(x1, x2, c, s, &y1, &y2);
    // Reference: the same fp32 angle, the rotation in double.
    const double angle = static_cast<double>(pos * freq);
    const double r1 = x1 * std::cos(angle) - x2 * std::sin(angle);
    const double r2 = x2 * std::cos(angle) + x1 * std::sin(angle);
    worst = std::fmax(worst, std::fmax(std::abs(y1 - r1), std::abs(y2 - r2)));
    pair_cos_sin<float>(pos, freq, true, &ic, &is);
    rotate_pair<float>(y1, y2, ic, is, &z1, &z2);
    worst_round_trip = std::fmax(worst_round_trip, std::fmax(std::abs(z1 - x1), std::abs(z2 - x2)));
  }
  OMNIVMED_EXPECT(worst < 4e-6, "fp32 rotation off by %g", worst);
  OMNIVMED_EXPECT(worst_round_trip < 8e-6, "inverse rotation off by %g", worst_round_trip);
}

int main() {
  table_follows_the_contract();
  invalid_sections_rejected();
  rotation_matches_double_and_inverse_undoes_it();
  return finish("test_rope_math");
}
