//! A deterministic generator of realistic danmaku bodies: DANMU_MSG, SEND_GIFT, INTERACT_WORD
//! and ONLINE_RANK_COUNT, shaped like Bilibili's public payloads, averaging about 550 bytes.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const WORDS: &[&str] = &[
    "哈哈哈哈",
    "主播好强",
    "666",
    "来了来了",
    "这波可以",
    "前排",
    "awsl",
    "草",
    "好耶",
    "冲冲冲",
    "下次一定",
    "牛啊",
    "?",
    "太真实了",
    "泪目",
    "经典",
    "gg",
    "打卡",
    "晚上好",
    "nice",
];
const NAMES: &[&str] = &[
    "夜猫子",
    "今天也要加油",
    "小明同学",
    "bili_7721",
    "风吹麦浪",
    "momo",
    "吃瓜群众",
    "路人甲",
];
const GIFTS: &[(&str, u32, u32)] = &[
    ("辣条", 1, 100),
    ("小心心", 30607, 0),
    ("牛哇牛哇", 31039, 100),
    ("打call", 31037, 500),
    ("干杯", 31049, 6600),
];

pub struct Corpus {
    rng: StdRng,
    ts: u64,
}

impl Corpus {
    pub fn new(seed: u64) -> Corpus {
        Corpus {
            rng: StdRng::seed_from_u64(seed),
            ts: 1_700_000_000_000,
        }
    }

    fn uid(&mut self) -> u64 {
        self.rng.gen_range(10_000..4_000_000_000u64)
    }

    fn text(&mut self) -> String {
        let n = self.rng.gen_range(1..4);
        (0..n)
            .map(|_| WORDS[self.rng.gen_range(0..WORDS.len())])
            .collect::<Vec<_>>()
            .join("")
    }

    fn name(&mut self) -> &'static str {
        NAMES[self.rng.gen_range(0..NAMES.len())]
    }

    /// One message body; the mix is 65 % danmaku, 5 % gifts, 20 % interact, 10 % rank count.
    pub fn next_body(&mut self) -> Vec<u8> {
        self.ts += self.rng.gen_range(1..200);
        let k = self.rng.gen_range(0..100);
        let s = if k < 65 {
            self.danmu()
        } else if k < 70 {
            self.gift()
        } else if k < 90 {
            self.interact()
        } else {
            format!(
                r#"{{"cmd":"ONLINE_RANK_COUNT","data":{{"count":{},"count_text":"{}","online_count":{},"online_count_text":"{}"}}}}"#,
                self.rng.gen_range(100..90000),
                self.rng.gen_range(100..90000),
                self.rng.gen_range(1000..900000),
                self.rng.gen_range(1000..900000)
            )
        };
        s.into_bytes()
    }

    fn danmu(&mut self) -> String {
        let (uid, name, text) = (self.uid(), self.name(), self.text());
        let medal_level = self.rng.gen_range(1..30);
        let color = [16777215u32, 14893055, 5566168][self.rng.gen_range(0..3)];
        let ts = self.ts;
        let ct = self.rng.gen::<u32>();
        let dm = self.rng.gen::<u64>();
        format!(
            r#"{{"cmd":"DANMU_MSG","info":[[0,1,25,{color},{ts},{r1},0,"{dm:x}",0,0,0,"",0,"{{}}","{{}}",{{"mode":0,"show_player_type":0,"extra":"{{\"send_from_me\":false,\"mode\":0,\"color\":{color},\"dm_type\":0,\"font_size\":25,\"player_mode\":1,\"show_player_type\":0,\"content\":\"{text}\",\"user_hash\":\"{ct}\"}}"}}],"{text}",[{uid},"{name}",0,0,0,10000,1,""],[{medal_level},"粉丝牌","主播{m}",{room},{mc},"",0,{mc},{mc},{mc},0,1,{ruid}],[{ul},0,9868950,">50000",0],["",""],0,0,null,{{"ts":{tss},"ct":"{ct:X}"}},0,0,null,null,0,105,[0],null]}}"#,
            r1 = self.rng.gen::<u32>(),
            m = self.rng.gen_range(1..99),
            room = self.rng.gen_range(1000..30_000_000),
            mc = self.rng.gen_range(1_000_000..16_000_000),
            ruid = self.uid(),
            ul = self.rng.gen_range(0..60),
            tss = ts / 1000,
        )
    }

    fn gift(&mut self) -> String {
        let (uid, name) = (self.uid(), self.name());
        let (gift, id, price) = GIFTS[self.rng.gen_range(0..GIFTS.len())];
        let num = self.rng.gen_range(1..10);
        format!(
            r#"{{"cmd":"SEND_GIFT","data":{{"action":"投喂","batch_combo_id":"batch:gift:combo_id:{uid}:{r}:{id}:{ts}","batch_combo_send":null,"beatId":"","biz_source":"Live","blind_gift":null,"broadcast_id":0,"coin_type":"{coin}","combo_resources_id":1,"combo_send":null,"combo_stay_time":3,"combo_total_coin":{total},"crit_prob":0,"demarcation":1,"discount_price":{price},"dmscore":{dm},"draw":0,"effect":0,"effect_block":1,"face":"https://i0.hdslb.com/bfs/face/{face:x}.jpg","face_effect_id":0,"face_effect_type":0,"float_sc_resource_id":0,"giftId":{id},"giftName":"{gift}","giftType":0,"gold":0,"guard_level":0,"is_first":{first},"is_join_receiver":false,"is_naming":false,"is_special_batch":0,"magnification":1,"medal_info":{{"anchor_roomid":0,"anchor_uname":"","guard_level":0,"icon_id":0,"is_lighted":1,"medal_color":{mcol},"medal_color_border":{mcol},"medal_color_end":{mcol},"medal_color_start":{mcol},"medal_level":{ml},"medal_name":"粉丝牌","special":"","target_id":{tid}}},"name_color":"","num":{num},"original_gift_name":"","price":{price},"rcost":{rcost},"receive_user_info":{{"uid":{tid},"uname":"主播"}},"remain":0,"rnd":"{rnd}","send_master":null,"silver":0,"super":0,"super_batch_gift_num":{num},"super_gift_num":{num},"svga_block":0,"switch":true,"tag_image":"","tid":"{rnd}","timestamp":{tss},"top_list":null,"total_coin":{total},"uid":{uid},"uname":"{name}"}}}}"#,
            r = self.rng.gen::<u32>(),
            ts = self.ts,
            coin = if price == 0 { "silver" } else { "gold" },
            total = price * num,
            dm = self.rng.gen_range(10..200),
            face = self.rng.gen::<u64>(),
            first = self.rng.gen_bool(0.3),
            mcol = self.rng.gen_range(1_000_000..16_000_000),
            ml = self.rng.gen_range(1..30),
            tid = self.rng.gen_range(1_000_000..900_000_000u64),
            rcost = self.rng.gen_range(1_000_000..900_000_000u64),
            rnd = self.rng.gen::<u64>(),
            tss = self.ts / 1000,
        )
    }

    fn interact(&mut self) -> String {
        let (uid, name) = (self.uid(), self.name());
        format!(
            r#"{{"cmd":"INTERACT_WORD","data":{{"contribution":{{"grade":0}},"core_user_type":0,"dmscore":{dm},"fans_medal":{{"anchor_roomid":{room},"guard_level":0,"icon_id":0,"is_lighted":{lit},"medal_color":{mcol},"medal_color_border":{mcol},"medal_color_end":{mcol},"medal_color_start":{mcol},"medal_level":{ml},"medal_name":"粉丝牌","score":{score},"special":"","target_id":{tid}}},"identities":[1],"is_spread":0,"msg_type":1,"privilege_type":0,"roomid":{room},"score":{ts},"spread_desc":"","spread_info":"","tail_icon":0,"timestamp":{tss},"trigger_time":{trig},"uid":{uid},"uname":"{name}","uname_color":""}}}}"#,
            dm = self.rng.gen_range(1..30),
            room = self.rng.gen_range(1000..30_000_000),
            lit = self.rng.gen_range(0..2),
            mcol = self.rng.gen_range(1_000_000..16_000_000),
            ml = self.rng.gen_range(0..30),
            score = self.rng.gen_range(0..100000),
            tid = self.rng.gen_range(1_000_000..900_000_000u64),
            ts = self.ts,
            tss = self.ts / 1000,
            trig = self.ts * 1_000_000 + self.rng.gen_range(0..1_000_000),
        )
    }
}
